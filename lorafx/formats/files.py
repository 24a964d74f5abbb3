"""Atomic writes: every file goes to a temp file in its own folder, then is renamed into place."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def write_atomically(writers: dict[str, Callable[[str], None]]) -> None:
    """Write several files so that none changes unless all were written.

    `writers` maps each final path to a function that writes a given temp path. All temp
    files are written first; only then are they renamed over the targets, so an error
    (or a kill) before that point leaves existing files untouched.
    """
    temps: dict[str, str] = {}
    try:
        for path, write in writers.items():
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
            os.close(fd)
            temps[path] = tmp
            write(tmp)
            with open(tmp, "rb+") as f:  # on disk before the rename, so a power loss cannot expose a torn file
                os.fsync(f.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def write_text(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    return write
