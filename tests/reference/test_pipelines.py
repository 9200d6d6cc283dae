"""The bundled pipelines load with stock diffusers classes, run, and are seed-deterministic."""

import pytest
import torch

from dq import reference
from dq.errors import DQError


def _classes():
    import diffusers

    return {
        "ref-sd": diffusers.StableDiffusionPipeline,
        "ref-pixart": diffusers.PixArtSigmaPipeline,
        "ref-video": diffusers.WanPipeline,
    }


def _built(name):
    missing = not (reference.path(name) / "model_index.json").exists()
    reason = f"{name} weights not built yet: python -m dq.reference.train_{name.split('-')[1]}"
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=reason))


@pytest.mark.parametrize("name", [_built(n) for n in ("ref-sd", "ref-pixart", "ref-video")])
def test_loads_with_stock_class_and_is_deterministic(name):
    pipe = _classes()[name].from_pretrained(reference.path(name), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt = reference.prompts("heldout", 1, video=reference.is_video(name))[0]
    kwargs = dict(num_inference_steps=2, output_type="np", **reference.generation_kwargs(name))

    def run():
        out = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
        return torch.from_numpy(out.frames if reference.is_video(name) else out.images)

    a, b = run(), run()
    assert torch.equal(a, b)
    expected = (1, 9, 32, 32, 3) if reference.is_video(name) else (1, 32, 32, 3)
    assert tuple(a.shape) == expected


def test_load_helper_returns_fp32():
    pipe = reference.load("ref-pixart")
    assert pipe.transformer.dtype == torch.float32 and len(pipe.transformer.transformer_blocks) >= 6


def test_sd_unet_is_sd15_shaped():
    from dq.reference.components import sd_unet

    config = sd_unet().config
    assert len(config.block_out_channels) >= 3 and config.layers_per_block == 2
    assert config.down_block_types[0] == "CrossAttnDownBlock2D" and config.up_block_types[-1] == "CrossAttnUpBlock2D"


def test_unknown_name_lists_names():
    with pytest.raises(DQError, match="ref-sd"):
        reference.load("nope")


def test_domain_clip_loads_through_open_clip():
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        reference.register_config(), pretrained=str(reference.clip_checkpoint())
    )
    _, _, tokenizer = reference.domain_clip()
    captions = reference.prompts("heldout", 4)
    images = torch.stack([preprocess(im) for im in reference.real_samples(captions)])
    with torch.no_grad():
        sims = model.encode_image(images) @ model.encode_text(tokenizer(captions)).T
    assert sims.shape == (4, 4)
