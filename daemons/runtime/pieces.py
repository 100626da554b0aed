"""SHA-1 piece hashes of files on disk: what a .torrent's ``pieces`` is made of.

Shared by the peer (``shoal peer create``, the daemon's storage) and the worker (which
seeds a task's outputs through its node's peer), so it lives below both daemons.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

_READ_CHUNK = 1024 * 1024


class LengthMismatch(ValueError):
    """A file on disk is not the length the layout gives it."""


def hash_files(directory: Path, files: Sequence[tuple], piece_length: int) -> bytes:
    """Concatenated SHA-1 piece hashes of files on disk, for ``create_metainfo``.

    ``files`` is the same list of ``(path, length[, attr])`` given to
    ``create_metainfo``; file ``path`` is read from ``directory.joinpath(*path)``
    (so for a single-file torrent pass the parent directory and ``(name,)``).
    Pad files (attr containing ``p``) contribute zeros. Raises
    :class:`LengthMismatch` if a file's size differs from its length.
    """
    if piece_length <= 0:
        raise ValueError("piece_length must be positive")
    out = []
    h = hashlib.sha1()
    filled = 0  # bytes in the current piece

    def feed(chunk: bytes | memoryview) -> None:
        nonlocal h, filled
        view = memoryview(chunk)
        while view:
            take = min(len(view), piece_length - filled)
            h.update(view[:take])
            filled += take
            view = view[take:]
            if filled == piece_length:
                out.append(h.digest())
                h = hashlib.sha1()
                filled = 0

    for entry in files:
        path, length = entry[0], entry[1]
        attr = entry[2] if len(entry) > 2 else ""
        if "p" in attr:
            remaining = length
            while remaining:
                n = min(remaining, _READ_CHUNK)
                feed(bytes(n))
                remaining -= n
            continue
        p = Path(directory).joinpath(*path)
        with open(p, "rb") as fh:
            if os.fstat(fh.fileno()).st_size != length:
                raise LengthMismatch(f"{p} is not {length} bytes long")
            while chunk := fh.read(_READ_CHUNK):
                feed(chunk)
    if filled:
        out.append(h.digest())
    return b"".join(out)
