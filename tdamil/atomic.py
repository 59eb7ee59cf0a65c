"""Files on disk: atomic writes (a reader never sees a half-written feature file, checkpoint, key or
picture) and the sha256 of a file's content.

Every file the project produces (feature h5, checkpoints, metrics CSV, QC and heatmap PNGs,
certificates and keys) is written through :func:`atomic_path`: the data go to a temporary file in
the destination folder, are flushed to disk, and then replace the destination in one
``os.replace``. If anything fails on the way, the temporary file is removed and the destination is
left exactly as it was, so an interrupted run loses no finished work. :func:`sha256_file` is the
one digest of a file's bytes (checkpoints in the audit log, encoder weights in the feature cache).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "sha256_file"]


@contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int = 0o644, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write; on success it atomically becomes ``path``.

    Args:
        path: the destination (its folder is created).
        mode: file permissions of the result (default 0644). The temporary file is created 0600,
            so with ``mode=0o600`` a private key is never readable by others, not even for a moment.
        suffix: ending of the temporary name; writers that pick a format from the file name
            (OpenCV, matplotlib) need the real extension, e.g. ``".tmp.png"``.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as fh:  # the data reach the disk before the rename makes them visible
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file's content, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
