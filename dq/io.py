"""Atomic output directories: build next to the target, then rename; never overwrite without consent."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from dq.errors import DQError


def check_writable(target: Path, overwrite: bool) -> None:
    """Refuse an existing target unless overwrite; call before any long work starts."""
    if target.exists() and not overwrite:
        raise DQError(f"{str(target)!r} already exists; pass --overwrite to replace it, or choose another --out.")


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target` in one rename.

    On any error (or interrupt) the temporary directory is removed and `target` is untouched.
    """
    target = Path(target)
    check_writable(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        backup = target.with_name(f".{target.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        tmp.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(target)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename.

    On any error (or interrupt) the temporary file is removed and `target` is untouched.

    Example:
        >>> with atomic_file("results.json") as tmp:
        ...     tmp.write_text(json.dumps(results))
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a file: a JSON list of strings (.json), else text with one prompt per line (blank lines
    and lines starting with '#' left out). Read as UTF-8; anything unreadable is a DQError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DQError(f"prompt file {str(path)!r} does not exist; pass an existing text file with one prompt per line.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DQError(f"cannot read prompt file {str(path)!r}: {e}; pass a UTF-8 text or JSON file.") from None
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            raise DQError(f"prompt file {str(path)!r} is not valid JSON: {e}.") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DQError(f"prompt file {str(path)!r} must hold a JSON list of strings.")
        return [p.strip() for p in prompts if p.strip()]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
