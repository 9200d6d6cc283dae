"""The procedural dataset: deterministic, captions unambiguous, held-out split disjoint."""

import numpy as np

from dq.reference import data, tokenization


def test_samples_are_deterministic():
    a, b = data.ShapesDataset("train", seed=3), data.ShapesDataset("train", seed=3)
    for i in (0, 7, 12345):
        (ca, ia), (cb, ib) = a[i], b[i]
        assert ca == cb and np.array_equal(np.asarray(ia), np.asarray(ib))
    assert a[0][1].size == (data.IMAGE_SIZE, data.IMAGE_SIZE)


def test_video_clips_move():
    caption, frames = data.ShapesVideoDataset("train", seed=0)[5]
    assert "moving" in caption and len(frames) == data.NUM_FRAMES >= 8
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[-1]))


def test_heldout_disjoint_from_train():
    for video in (False, True):
        train = {s.caption for s in data.split_scenes("train", video)}
        heldout = {s.caption for s in data.split_scenes("heldout", video)}
        assert heldout and not train & heldout
        assert len(train | heldout) == len(data.all_scenes(video))
        drawn = {data.ShapesDataset("train").scene(i).caption for i in range(500)}
        assert drawn <= {s.caption for s in data.split_scenes("train")}


def test_captions_are_unique_and_invertible():
    scenes = data.all_scenes(False) + data.all_scenes(True)
    assert len({s.caption for s in scenes}) == len(scenes)
    assert all(data.scene_from_caption(s.caption) == s for s in scenes[::37])


def test_prompts_deterministic_and_cycled():
    first = data.prompts("heldout", 200)
    assert first == data.prompts("heldout", 200) and len(first) == 200
    assert set(first) == set(data.prompts("heldout"))


def test_real_samples_match_kind():
    image, clip = data.real_samples([data.prompts()[0], data.prompts(video=True)[0]])
    assert image.size == (32, 32) and len(clip) == data.NUM_FRAMES


def test_tokenizers_one_token_per_word():
    caption = data.prompts("train", 1)[0]
    words = len(caption.split())
    assert len(tokenization.clip_tokenizer()(caption).input_ids) == words + 2
    assert len(tokenization.t5_tokenizer()(caption).input_ids) == words + 1
