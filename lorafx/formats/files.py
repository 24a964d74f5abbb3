"""Atomic writes of a folder's files, and the lock that keeps readers off a half-replaced set.

A save writes each file to a temp file beside it (`.tmp-<id>-<name>`), then, holding the
folder's exclusive lock, marks the save committed (`.tmp-<id>.commit`), renames every temp
file into place and removes the mark. Readers that take the folder's shared lock
(`locked_folder`) therefore see all files of one save, never a mix of two, also with several
processes saving at once; a process killed while writing its temp files changes nothing, and
one killed between the renames leaves the mark, so the next lock on the folder finishes its
renames (the set becomes the new save, whole). The lock is flock(2) on the folder itself: no
lock file, and readers need no write permission. Files are created like any tool creates
them: mode 0666 minus the umask.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from typing import Callable

TEMP = ".tmp-"
COMMIT = ".commit"
# Filesystems where flock is not available (some network mounts): saves there are atomic per file only.
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL)


def write_atomically(writers: dict[str, Callable[[str], None]]) -> None:
    """Write the files of one folder so that none changes unless all were written.

    `writers` maps each final path to a function that writes a given temp path. All temp
    files are written (and flushed to disk) first, outside the lock; only then are they
    renamed over the targets, under the folder's exclusive lock. An error while writing
    names the file being written and leaves every existing file as it was.
    """
    folders = {os.path.dirname(os.path.abspath(path)) for path in writers}
    if len(folders) != 1:
        raise ValueError(f"write_atomically writes the files of one folder, got {sorted(folders)}")
    folder = folders.pop()
    os.makedirs(folder, exist_ok=True)
    save = secrets.token_hex(8)
    temps = {path: os.path.join(folder, f"{TEMP}{save}-{os.path.basename(path)}") for path in writers}
    mark = os.path.join(folder, TEMP + save + COMMIT)
    committed = False
    try:
        for path, write in writers.items():
            try:
                fd = os.open(temps[path], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0666 minus the umask, read without changing it
                os.close(fd)
                write(temps[path])
                if stat.S_IMODE(os.stat(temps[path]).st_mode) != mode:
                    os.chmod(temps[path], mode)  # a writer that renames its own temp file in (safetensors) gives 0600
                _fsync(temps[path])  # on disk before the rename, so a power loss cannot expose a torn file
            except OSError as e:
                why = f"{e.strerror or e} while writing {path}; the file on disk is unchanged"
                raise (type(e)(e.errno, why) if e.errno else type(e)(why)) from e
        with locked_folder(folder, exclusive=True):
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            committed = True  # from here on the temp files are the save: an error leaves them for the next lock
            _fsync(folder)  # the mark is on disk before any rename, so a crash mid-way is finished later
            _finish(folder, save, [os.path.basename(path) for path in writers])  # in the writers' order
    finally:
        if not committed:
            for tmp in temps.values():
                if os.path.exists(tmp):
                    os.remove(tmp)


@contextlib.contextmanager
def locked_folder(folder: str, exclusive: bool = False):
    """Hold the folder's lock: shared for readers, exclusive for a save's renames. A save that
    was interrupted between its renames is finished first. A missing folder is not locked
    (the read that follows reports it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        yield
        return
    try:
        if _lock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
            interrupted = [name for name in os.listdir(folder) if name.startswith(TEMP) and name.endswith(COMMIT)]
            if interrupted:
                if not exclusive:
                    _lock(fd, fcntl.LOCK_EX)
                for name in interrupted:
                    save = name[len(TEMP):-len(COMMIT)]
                    prefix = f"{TEMP}{save}-"
                    _finish(folder, save, [n[len(prefix):] for n in os.listdir(folder) if n.startswith(prefix)])
                if not exclusive:
                    _lock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation)
    except OSError as e:
        if e.errno in NO_LOCKS:
            return False
        raise
    return True


def _finish(folder: str, save: str, names: list[str]) -> None:
    """Rename the temp files of a committed save into place (`names`, in order), then drop its mark."""
    for name in names:
        tmp = os.path.join(folder, f"{TEMP}{save}-{name}")
        if os.path.exists(tmp):  # a save finished by another process's lock meanwhile has none left
            os.replace(tmp, os.path.join(folder, name))
    _fsync(folder)
    mark = os.path.join(folder, TEMP + save + COMMIT)
    if os.path.exists(mark):
        os.remove(mark)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_folder_path(directory, what: str) -> str:
    """os.fspath(directory), refusing "" (which would write into the current folder unasked)."""
    directory = os.fspath(directory)
    if not isinstance(directory, str) or not directory.strip():
        raise ValueError(f"{what} folder path {directory!r} is empty: give the folder to write (\".\" for the current one)")
    return directory


def write_text(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    return write
