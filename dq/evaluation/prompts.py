"""The prompts of an eval run: the reference domain's held-out set, or a prompt file, cut or cycled to ``n``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dq import reference
from dq.errors import DQError
from dq.io import read_prompt_file

REFERENCE_PROMPTS = "reference"
DEFAULT_REFERENCE_N = 16


def read_prompts(source: str, n: Optional[int], video: bool = False) -> list[str]:
    """Return the evaluation prompts: the first ``n`` of a file (cycled if shorter), or the reference held-out set.

    A prompt file is text with one prompt per line or a ``.json`` list of strings (``dq.io.read_prompt_file``).

    Args:
        source: A file path, or ``"reference"`` for the reference domain's held-out prompts.
        n: How many prompts; None means every prompt in the file (16 for ``"reference"``).
        video: Draw the reference domain's video prompts.

    Example:
        >>> read_prompts("reference", 4)[0]
        'a small ...'
    """
    if n is not None and n < 1:
        raise DQError(f"--n {n}: expected a positive number of prompts.")
    if source == REFERENCE_PROMPTS:
        return reference.prompts("heldout", n or DEFAULT_REFERENCE_N, video=video)
    prompts = read_prompt_file(Path(source).expanduser())
    if not prompts:
        raise DQError(f"--prompts {source}: the file has no prompts; expected one prompt per line.")
    count = n or len(prompts)
    return [prompts[i % len(prompts)] for i in range(count)]

