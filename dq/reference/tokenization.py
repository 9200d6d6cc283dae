"""Offline tokenizers for the reference vocabulary (no hub files).

A CLIP-style byte-level BPE is learned on the caption words so each word is one token;
the same merges serve the transformers ``CLIPTokenizer`` and open_clip's ``SimpleTokenizer``.
The T5 tokenizer is a unigram model whose pieces are the caption words.
"""

from __future__ import annotations

import gzip
import os
from collections import Counter

from .data import all_scenes

CLIP_CONTEXT_LENGTH = 16
T5_MAX_LENGTH = 16


def caption_words() -> list[str]:
    """Sorted set of every word used by image and video captions."""
    words = set()
    for scene in all_scenes(False) + all_scenes(True):
        words.update(scene.caption.split())
    return sorted(words)


def _byte_symbols() -> list[str]:
    # GPT-2 / CLIP printable mapping of the 256 byte values.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def bpe_merges() -> list[tuple[str, str]]:
    """Greedy BPE merges until every caption word is a single ``word</w>`` symbol."""
    words = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in caption_words()}
    merges = []
    while any(len(s) > 1 for s in words.values()):
        pairs = Counter(p for s in words.values() for p in zip(s, s[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in words.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            words[w] = tuple(out)
    return merges


def clip_vocab() -> dict[str, int]:
    """CLIP vocabulary layout: bytes, bytes + ``</w>``, merges, then the two special tokens."""
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in bpe_merges()]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}


def clip_tokenizer():
    """A transformers ``CLIPTokenizer`` over the caption vocabulary."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=clip_vocab(), merges=bpe_merges(), model_max_length=CLIP_CONTEXT_LENGTH)


def write_open_clip_bpe(path: str) -> str:
    """Write the merges in open_clip's gzipped ``bpe_simple_vocab`` format; returns ``path``."""
    lines = ["#version: 0.2 dq reference"] + [" ".join(m) for m in bpe_merges()]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write("\n".join(lines).encode("utf-8"))
    return path


def t5_tokenizer():
    """A transformers ``T5Tokenizer`` (fast) whose pieces are the caption words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -10.0)]
    pieces += [("\u2581" + w, -1.0) for w in caption_words()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)
