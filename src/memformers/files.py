"""Files and folders written atomically: built under a hidden name beside the target, then renamed into place, so a
reader (or a crash) never sees half of one. Saved models, training checkpoints, converted backbones, result grids,
pictures and the tokenized-noise cache all go through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def staging(target: Path) -> Path:
    """The hidden folder beside `target` that is written before it is renamed (the same name in every process)."""
    return target.with_name(f".{target.name}.tmp")


def fresh_folder(target: Path) -> Path:
    """An empty `staging` folder for `target` (a leftover of an interrupted write is cleared)."""
    tmp = staging(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_folder(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; a previous `target` stays complete until the very last rename."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.replace(old)
    tmp.replace(target)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """`with atomic_folder(path) as tmp:` write into `tmp`; it becomes `path` only when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_folder(target)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """`with atomic_file(path) as tmp:` write the file `tmp` (same suffix, so writers that go by it still work); it
    becomes `path` only when the block succeeds. Each process writes its own temporary file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp{os.getpid()}{target.suffix}")
    try:
        yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
