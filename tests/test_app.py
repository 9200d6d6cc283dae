"""The Gradio demo (dq.app, app.py): variant parsing, scoring, media, the handler, and the served app.

Models are tiny diffusers pipelines with a real tokenizer and text encoder (the reference components, shrunk),
saved to a temp dir and loaded through dq.pipelines.loading like any local model.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from dq.app import AppConfig, Comparer, GenerateHandler, GenerationRequest, PipelineCache, build_demo, launch
from dq.app.generate import Comparison, VariantResult, call_arguments, results_table, score
from dq.app.media import GIF_FRAME_MS, MediaDir, display_image, side_by_side
from dq.app.variants import cache_choices, compose_variants
from dq.cache import CACHE_METHODS
from dq.cache.handle import handle_of
from dq.cli import build_parser
from dq.commands.app import config_from_args
from dq.evaluation.variants import FP, Variant
from dq.metrics import LPIPS

STEPS = 2


def _save_tiny_sd(path: Path) -> str:
    """A StableDiffusionPipeline with tokenizer + CLIP text encoder, a 2-level UNet and a 16x16 VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from dq.reference import components
    from dq.reference.tokenization import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=components.TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
        sample_size=16,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=components.clip_text_encoder(), tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return str(path)


def _save_tiny_wan(path: Path) -> str:
    """A WanPipeline with tokenizer + UMT5 text encoder, a 2-block transformer and a small video VAE."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from dq.reference import components
    from dq.reference.tokenization import t5_tokenizer

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=components.TEXT_DIM, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2,
                           scale_factor_spatial=2)
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(), text_encoder=components.t5_text_encoder(umt5=True), transformer=transformer,
        vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory) -> str:
    return _save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(autouse=True)
def _gradio_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def comparer() -> Comparer:
    return Comparer(PipelineCache("cpu", torch.float32), lpips=None, warmup=False)


# ---------------------------------------------------------------- variants


def test_compose_variants_puts_fp_first_and_crosses_caches():
    assert compose_variants(["w8a8", "fp"], ["deepcache"], "w4a8+deepcache:interval=5, w8a8") == [
        "fp", "w8a8", "fp+deepcache", "w8a8+deepcache", "w4a8+deepcache:interval=5",
    ]
    assert compose_variants([]) == [FP]
    assert compose_variants([], [], "w8a8+deepcache:interval=5,branch=0") == [FP, "w8a8+deepcache:interval=5,branch=0"]


def test_cache_choices_come_from_the_cache_registry():
    assert cache_choices() == CACHE_METHODS.names()


# ---------------------------------------------------------------- scoring, table, media


def _result(name: str, pixels: np.ndarray, seconds: float, weight_bytes: int, recipe=None) -> VariantResult:
    return VariantResult(Variant(name, recipe), pixels, seconds, [seconds / 4] * 4, 2**20, "process_peak_rss",
                         weight_bytes)


def test_score_and_table_report_psnr_and_ratios_vs_fp():
    rng = np.random.default_rng(0)
    fp = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    noisy = np.clip(fp.astype(int) + rng.integers(-8, 9, fp.shape), 0, 255).astype(np.uint8)
    results = [_result("fp", fp, 2.0, 4000), _result("w4a16", noisy, 1.0, 1000, "w4a16"),
               _result("same", fp.copy(), 4.0, 4000, "w8a8")]
    score(results)
    mse = np.mean((noisy / 255.0 - fp / 255.0) ** 2)
    assert results[1].psnr == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert math.isinf(results[2].psnr)
    headers, rows = results_table(Comparison(GenerationRequest("m", "p", []), results, False, "cpu"))
    table = {row[0]: dict(zip(headers, row)) for row in rows}
    assert table["w4a16"]["speed-up"] == "2.00x" and table["same"]["speed-up"] == "0.50x"
    assert table["w4a16"]["weights vs FP"] == "0.250x"
    assert table["w4a16"]["per step (ms)"] == "250.00"
    assert float(table["w4a16"]["PSNR (dB)"]) == pytest.approx(results[1].psnr, abs=0.01)
    assert table["same"]["PSNR (dB)"].startswith("inf")
    assert table["fp"]["PSNR (dB)"] == "—"


def test_score_records_the_lpips_reason_when_its_weights_are_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty hub cache
    pixels = np.zeros((8, 8, 3), np.uint8)
    results = [_result("fp", pixels, 1.0, 1), _result("w8a8", pixels + 1, 1.0, 1, "w8a8")]
    notes = score(results, LPIPS("alex"))
    assert results[1].lpips is None and results[1].psnr is not None
    assert any("LPIPS n/a" in note and "weights" in note for note in notes)


def test_media_enlarges_small_images_and_writes_animated_side_by_side_gifs(tmp_path):
    image = np.arange(32 * 16 * 3, dtype=np.uint8).reshape(32, 16, 3)
    big = display_image(image)
    assert big.size == (128, 256)
    assert np.array_equal(np.asarray(big)[::8, ::8], image)  # nearest neighbour: every pixel kept exactly
    fp = np.zeros((3, 8, 8, 3), np.uint8) + np.array([0, 60, 120], np.uint8)[:, None, None, None]  # 3 distinct frames
    joined = side_by_side([fp, fp + 100], gap=2)
    assert joined.shape == (3, 8, 18, 3) and np.array_equal(joined[:, :, 10:], fp + 100)
    assert (joined[:, :, 8:10] == 255).all()
    path = MediaDir(str(tmp_path)).gif(joined, "fp-vs-w8a8")
    with Image.open(path) as gif:
        assert gif.n_frames == 3 and gif.is_animated


def test_calibration_of_reference_pipelines_runs_at_their_trained_size():
    class ImagePipe:
        def __call__(self, prompt, height=None, width=None, use_resolution_binning=True):
            pass

    cache = PipelineCache("cpu", torch.float32)
    calib = cache._calib_for("ref-pixart", ImagePipe(), "svdquant-w4a4")
    assert calib.pipeline_kwargs == {"height": 32, "width": 32, "use_resolution_binning": False}
    assert isinstance(calib.prompts, list) and calib.prompts
    assert cache._calib_for("ref-pixart", ImagePipe(), "w8a8") is None  # data-free recipes need no calibration
    assert cache._calib_for("/some/local/model", ImagePipe(), "svdquant-w4a4") is None  # the recipe's default set


# ---------------------------------------------------------------- the handler on a real (tiny) pipeline


def test_call_arguments_keep_requested_size_and_reject_negative_prompt_where_unsupported(sd_model, comparer):
    pipe = comparer.cache.get(sd_model).pipe
    kwargs = call_arguments(pipe, GenerationRequest(sd_model, "a red circle", [], steps=3, height=24, guidance=2.0))
    assert kwargs["height"] == 24 and "width" not in kwargs and kwargs["num_inference_steps"] == 3
    assert kwargs["guidance_scale"] == 2.0 and kwargs["output_type"] == "np"


def test_compare_builds_each_recipe_once_and_scores_against_fp(sd_model, comparer):
    request = GenerationRequest(sd_model, "a red circle", ["w8a8", "w4a16"], seed=3, steps=STEPS)
    first = comparer.compare(request)
    assert [r.spec.name for r in first.results] == ["fp", "w8a8", "w4a16"]
    built = comparer.cache.get(sd_model, "w8a8")
    fp_pipe = comparer.cache.get(sd_model).pipe
    assert fp_pipe.text_encoder is built.pipe.text_encoder and fp_pipe.vae is built.pipe.vae  # shared, not copied
    assert fp_pipe.unet is not built.pipe.unet and not getattr(fp_pipe.unet, "is_quantized", False)
    second = comparer.compare(request)
    assert comparer.cache.get(sd_model, "w8a8") is built  # reused, not re-quantized
    assert all(r.build_seconds == 0.0 for r in second.results)
    for a, b in zip(first.results, second.results):  # same seed -> same pixels, run after run
        assert np.array_equal(a.pixels, b.pixels)
    fp, w8a8, w4a16 = first.results
    assert fp.pixels.shape == (16, 16, 3) and fp.pixels.dtype == np.uint8
    assert len(fp.step_seconds) == STEPS
    assert w8a8.weight_bytes < fp.weight_bytes and w4a16.weight_bytes < fp.weight_bytes
    assert 15 < w8a8.psnr < math.inf and 10 < w4a16.psnr < math.inf  # close to FP, not identical


def test_handler_returns_widget_values_and_turns_dqerrors_into_gr_errors(sd_model, comparer, tmp_path):
    handler = GenerateHandler(comparer, MediaDir(str(tmp_path)))
    slider, clip, gallery, table, status = handler(
        sd_model, "a blue square", "", 0, STEPS, None, None, None, None, ["w8a8"], [], "", "w8a8")
    assert clip is None and len(gallery) == 2 and gallery[1][1].startswith("w8a8")
    assert slider[0].size == slider[1].size == (256, 256)
    assert [row[0] for row in table["data"]] == ["fp", "w8a8"] and len(table["headers"]) == len(table["data"][0])
    assert "FP vs **w8a8**" in status
    with pytest.raises(gr.Error, match="no-such-recipe"):
        handler(sd_model, "a blue square", "", 0, STEPS, None, None, None, None, ["no-such-recipe"], [], "", "")
    with pytest.raises(gr.Error, match="prompt is empty"):
        handler(sd_model, " ", "", 0, STEPS, None, None, None, None, [], [], "", "")


def test_cache_variants_reuse_the_quantized_pipeline_and_remove_their_hooks(sd_model, comparer):
    result = comparer.compare(GenerationRequest(sd_model, "a red circle", ["w8a8", "w8a8+deepcache"], steps=STEPS))
    w8a8, cached = result.results[1:]
    assert cached.spec.cache is not None and cached.weight_bytes == w8a8.weight_bytes
    assert len(cached.step_seconds) == STEPS and 10 < cached.psnr < math.inf
    assert handle_of(comparer.cache.get(sd_model, "w8a8").pipe.unet) is None  # enabled for the call only
    assert [key for key in comparer.cache.keys() if key[1] == "w8a8"] == [(sd_model, "w8a8")]


def test_out_of_memory_unloads_quantized_variants_and_reports_it(tmp_path):
    class OOMComparer:
        class cache:
            evicted: list = []

            @classmethod
            def evict(cls, model=None, keep_fp=False):
                cls.evicted.append(keep_fp)

        def compare(self, request, progress=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handler = GenerateHandler(OOMComparer(), MediaDir(str(tmp_path)))
    with pytest.raises(gr.Error, match="out of memory: CUDA out of memory"):
        handler("m", "a red circle", "", 0, STEPS, "", None, None, None, ["w8a8"], [], "", "")
    assert OOMComparer.cache.evicted == [True]


def test_video_pipelines_show_gifs_per_variant_and_clips_side_by_side(tmp_path):
    model = _save_tiny_wan(tmp_path / "tiny-wan")
    handler = GenerateHandler(Comparer(PipelineCache("cpu", torch.float32), None, warmup=False),
                              MediaDir(str(tmp_path)))
    slider, clip, gallery, table, _ = handler(
        model, "a red circle moving right", "", 0, STEPS, None, 16, 16, 5, ["w8a8"], [], "", "")
    with Image.open(clip) as gif:  # FP | variant; Pillow merges identical consecutive frames, durations add up
        assert gif.width > 2 * gif.height
        assert sum(frame.info["duration"] for frame in ImageSequence.Iterator(gif)) == 5 * GIF_FRAME_MS
    assert all(Path(item).suffix == ".gif" for item, _ in gallery) and len(gallery) == 2
    assert float(dict(zip(table["headers"], table["data"][1]))["PSNR (dB)"]) > 10


# ---------------------------------------------------------------- the served app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_app_generates_compares_and_survives_errors(sd_model, comparer):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    comparer.cache.evict()  # start from nothing loaded, so the status reports what this app built
    config = AppConfig(model=sd_model, device="cpu", steps=STEPS, warmup=False, recipes=("w8a8",))
    demo = build_demo(config, cache=comparer.cache)
    _, url, _ = launch(demo, server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    client = Client(url, verbose=False)
    try:
        assert "/generate" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        args = [sd_model, "a red circle", "", 0, STEPS, None, None, None, None]
        slider, clip, gallery, table, status = client.predict(*args, ["w8a8"], [], "", "w8a8", api_name="/generate")
        assert len(slider) == 2 and all(Path(p).suffix == ".png" for p in slider)
        assert [g["caption"].split(" ")[0] for g in gallery] == ["fp", "w8a8"]
        assert [row[0] for row in table["data"]] == ["fp", "w8a8"]
        with pytest.raises(AppError, match="neither an existing local directory"):
            client.predict("/no/such/model", *args[1:], ["w8a8"], [], "", "", api_name="/generate")
        # Still serving; the second variant is compared in the slider and w8a8 comes from the cache.
        _, _, gallery, table, status = client.predict(*args, ["w8a8", "w4a16"], [], "", "w4a16", api_name="/generate")
        assert [row[0] for row in table["data"]] == ["fp", "w8a8", "w4a16"] and "FP vs **w4a16**" in status
        assert "built w8a8" not in status and "built w4a16" in status
    finally:
        client.close()
        demo.close()


def test_dq_app_subcommand_is_registered():
    args = build_parser("app").parse_args(["app", "--port", "7999", "--dtype", "float32", "--calib-samples", "4"])
    config = config_from_args(args)
    assert args.port == 7999 and config.dtype == torch.float32 and config.calib.samples == 4
