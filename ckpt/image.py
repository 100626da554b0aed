"""A rank's checkpoint image: the registered buffers and its last committed copy.

The registered buffers are laid out at block-aligned offsets, followed by the
library's own state (the *meta*: packed by :class:`shoal.ckpt.rank.Rank`). The
rank keeps its last committed image in its own memory (``buf``, ``size`` bytes
of it); a checkpoint sends the coordinator ``changed_blocks(old, new)``, XOR
deltas of the blocks that changed (:meth:`Image.capture`), and folds the same
deltas into its own copy once the coordinator has committed them
(:meth:`Image.fold`), so the image and the parity never disagree. The image is
also served, range by range, to the coordinator (``ckpt_read``, ``ckpt_size``),
which decodes a lost rank's image from the survivors' and the parity.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shoal.core.checkpoint.parity import changed_blocks, xor_into
from shoal.daemons.runtime.rpc import rpc_method
from shoal.protocol.checkpoint import CkptRead
from shoal.protocol.contract import BadParams


def _buffer_view(buf: Any) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous or not buf.flags.writeable:
            raise ValueError("registered arrays must be C-contiguous and writable")
        return buf.reshape(-1).view(np.uint8)
    view = np.frombuffer(buf, dtype=np.uint8)
    if not view.flags.writeable:
        raise ValueError("registered buffers must be writable (bytearray, mmap opened for writing)")
    return view


class Image:
    """The registered state and the last committed checkpoint image of one rank."""

    def __init__(self, block_size: int, max_frame: int) -> None:
        self.block_size = block_size
        self.max_frame = max_frame
        self.state: dict[str, Any] = {}  # the app's registered buffers, by name
        self.layout: list[tuple[str, np.ndarray, int]] = []  # (name, bytes view, offset in the image)
        self.arrays_end = 0  # where the meta starts
        self.buf = np.zeros(0, dtype=np.uint8)  # the last committed image (may be longer than size)
        self.size = 0  # its length in bytes

    def register(self, name: str, buf: Any) -> Any:
        """Lay out a buffer after the others (block-aligned); returns it."""
        if name in self.state:
            raise ValueError(f"{name!r} is already registered")
        view = _buffer_view(buf)
        self.layout.append((name, view, self.arrays_end))
        self.arrays_end += -(-view.size // self.block_size) * self.block_size
        self.state[name] = buf
        return buf

    def ensure(self, size: int) -> None:
        """Room for an image of ``size`` bytes."""
        if size > self.buf.size:
            new = np.zeros(max(size, self.arrays_end + (1 << 20)), dtype=np.uint8)
            new[: self.buf.size] = self.buf
            self.buf = new

    def capture(self, meta: bytes) -> tuple[list[tuple[int, bytes]], int]:
        """The deltas from the committed image to the current buffers followed by ``meta``, and the new size."""
        bs = self.block_size
        size = self.arrays_end + len(meta)
        self.ensure(max(size, self.size))
        deltas: list[tuple[int, bytes]] = []
        for _name, view, off in self.layout:
            for k, d in changed_blocks(self.buf[off : off + view.size], view, bs):
                deltas.append((off // bs + k, d))
        base = self.arrays_end // bs
        old_meta = self.buf[self.arrays_end : max(self.size, self.arrays_end)]
        for k, d in changed_blocks(old_meta, meta, bs):
            deltas.append((base + k, d))
        return deltas, size

    def fold(self, deltas: list[tuple[int, bytes]], size: int) -> None:
        """The coordinator committed ``deltas``: apply them to our copy too."""
        bs = self.block_size
        for k, d in deltas:
            xor_into(self.buf[k * bs : k * bs + len(d)], d)
        self.size = size

    def write(self, offset: int, data: bytes) -> None:
        """A range of a recovered image (a replacement reading its lost image)."""
        self.buf[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def restore(self) -> bytes:
        """Copy the committed image back into the registered buffers; returns its meta."""
        ck = self.buf
        for _name, view, off in self.layout:
            view[:] = ck[off : off + view.size]
        return bytes(ck[self.arrays_end : self.size])

    @rpc_method("ckpt_read", CkptRead)
    async def _on_read(self, p: CkptRead) -> bytes:
        if p.length > self.max_frame // 2:
            raise BadParams(f"length: must be <= {self.max_frame // 2}")
        return self.buf[p.offset : min(p.offset + p.length, self.size)].tobytes()

    @rpc_method("ckpt_size")
    async def _on_size(self) -> int:
        return self.size
