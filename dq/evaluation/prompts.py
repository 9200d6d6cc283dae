"""The prompts of an eval run: the reference domain's held-out set, or a prompt file, cut or cycled to ``n``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from dq import reference
from dq.errors import DQError
from dq.io import read_prompt_file

REFERENCE_PROMPTS = "reference"
DEFAULT_REFERENCE_N = 16


def read_prompts(source: str, n: Optional[int], video: bool = False) -> list[str]:
    """Return the evaluation prompts: the first ``n`` of a file (cycled if shorter), or the reference held-out set.

    A prompt file is text with one prompt per line (read by ``dq.io.read_prompt_file``) or a ``.json`` list
    of strings.

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
    path = Path(source).expanduser()
    try:
        prompts = _read_json_prompts(path) if path.suffix == ".json" else read_prompt_file(path)
    except (OSError, UnicodeDecodeError) as error:
        raise DQError(f"--prompts {source}: cannot read it ({error}); expected a UTF-8 text file.") from None
    if not prompts:
        raise DQError(f"--prompts {source}: the file has no prompts; expected one prompt per line.")
    count = n or len(prompts)
    return [prompts[i % len(prompts)] for i in range(count)]


def _read_json_prompts(path: Path) -> list[str]:
    """The non-blank strings of a JSON list."""
    if not path.is_file():
        raise DQError(f"prompt file {str(path)!r} does not exist; pass an existing .json list of strings.")
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DQError(f"--prompts {path}: invalid JSON ({error}); expected a list of strings.") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise DQError(f"--prompts {path}: expected a JSON list of strings.")
    return [p.strip() for p in prompts if p.strip()]
