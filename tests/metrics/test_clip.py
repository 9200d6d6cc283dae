import open_clip
import pytest
import torch
from torch import nn

from dq.errors import DQError
from dq.metrics import METRICS, OpenCLIPScore, caption_retrieval_accuracy

CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a small star"]


@pytest.fixture
def clip_model(tiny_clip):
    name, weights = tiny_clip
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def _embeddings(model, preprocess, tokenizer, images, texts):
    """Reference embeddings through open_clip's own PIL preprocessing."""
    from PIL import Image

    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([preprocess(p) for p in pil]))
        text_emb = model.encode_text(tokenizer(texts))
    return nn.functional.normalize(image_emb, dim=-1), nn.functional.normalize(text_emb, dim=-1)


def test_clip_score_matches_open_clip(images, tiny_clip, clip_model):
    metric = METRICS.get("clip")(tiny_clip)
    metric.update(images[:4], prompts=CAPTIONS)
    result = metric.compute()
    image_emb, text_emb = _embeddings(*clip_model, images[:4], CAPTIONS)
    expected = 100 * (image_emb * text_emb).sum(-1)
    assert result["per_image"] == pytest.approx(expected.tolist(), abs=1e-3)
    assert result["value"] == pytest.approx(max(expected.mean().item(), 0.0), abs=1e-3)
    assert metric.settings()["backbone"] == f"open_clip:{tiny_clip[0]}:{tiny_clip[1]}"


def test_clip_score_is_clipped_at_zero(images, clip_model):
    model, _, tokenizer = clip_model
    metric = OpenCLIPScore(model, tokenizer=tokenizer)
    metric.update(images[:4], prompts=CAPTIONS)
    scores = torch.tensor(metric.compute()["per_image"])
    with torch.no_grad():
        model.logit_scale.fill_(0)
        model.text_projection.neg_()  # flips every cosine
    flipped = OpenCLIPScore(model, tokenizer=tokenizer)
    flipped.update(images[:4], prompts=CAPTIONS)
    result = flipped.compute()
    assert result["per_image"] == pytest.approx((-scores).tolist(), abs=1e-3)
    assert result["value"] == max(-scores.mean().item(), 0.0)


def test_model_object_needs_tokenizer(clip_model):
    with pytest.raises(DQError, match="tokenizer="):
        OpenCLIPScore(clip_model[0])


def test_prompt_count_must_match(images, tiny_clip):
    with pytest.raises(DQError, match="one prompt per image"):
        OpenCLIPScore(tiny_clip).update(images[:4], prompts=CAPTIONS[:3])


def test_caption_retrieval_accuracy_matches_argmax(images, clip_model):
    model, preprocess, tokenizer = clip_model
    captions = CAPTIONS + CAPTIONS  # 8 images, 4 distinct candidates
    accuracy = caption_retrieval_accuracy(model, tokenizer, images, captions)
    image_emb, text_emb = _embeddings(model, preprocess, tokenizer, images, CAPTIONS)
    best = (image_emb @ text_emb.T).argmax(-1)
    assert accuracy == pytest.approx((best == torch.arange(8) % 4).float().mean().item())


class ColourCLIP(nn.Module):
    """An open_clip-shaped stub whose embeddings are mean colours and colour words."""

    COLOURS = ("red", "green", "blue")

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Module()
        self.visual.image_size = 8
        self.scale = nn.Parameter(torch.ones(()))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.scale * pixels.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(tokens, 3).float()

    @classmethod
    def tokenize(cls, texts: list[str]) -> torch.Tensor:
        return torch.tensor([cls.COLOURS.index(text.split()[-1]) for text in texts])


def test_caption_retrieval_counts_images_whose_caption_ranks_first():
    pixels = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    for index in range(3):
        pixels[index, index] = 255  # pure red, green, blue
    captions = ["pure red", "pure green", "pure red"]  # the blue image is captioned wrongly
    candidates = [f"pure {colour}" for colour in ColourCLIP.COLOURS]
    accuracy = caption_retrieval_accuracy(ColourCLIP(), ColourCLIP.tokenize, pixels, captions, candidates)
    assert accuracy == pytest.approx(2 / 3)


def test_caption_retrieval_needs_true_captions_among_candidates(images, clip_model):
    model, _, tokenizer = clip_model
    with pytest.raises(DQError, match="not among the candidates"):
        caption_retrieval_accuracy(model, tokenizer, images[:2], CAPTIONS[:2], candidates=CAPTIONS[2:])


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """A tiny random transformers CLIPModel + CLIPProcessor saved to a local directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    root = tmp_path_factory.mktemp("hf_clip")
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]}
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, **special, "vocab_size": len(vocab), "pad_token_id": special["eos_token_id"]},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root)
    return root


def test_hf_clip_score_loads_a_local_directory(images, hf_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    metric = METRICS.get("clip-hf")(hf_clip_dir)
    metric.update(images[:4], prompts=CAPTIONS)
    model, processor = CLIPModel.from_pretrained(hf_clip_dir), CLIPProcessor.from_pretrained(hf_clip_dir)
    inputs = processor(text=CAPTIONS, images=list(images[:4]), return_tensors="pt", padding=True)
    with torch.no_grad():
        image_emb = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_emb = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
    cosine = nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
    assert metric.compute()["value"] == pytest.approx(max(100 * cosine.mean().item(), 0.0), abs=1e-3)
    assert metric.settings() == {"metric": "clip-hf", "backbone": f"transformers:{hf_clip_dir}"}
