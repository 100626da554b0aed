"""Piece storage for the peer daemon: blocks onto files, verification, resume data.

Synchronous file I/O; the trio daemon calls it through ``trio.to_thread``.
One internal lock serialises the public methods, so several worker threads
may share a :class:`Storage`.

Layout
------

A single-file torrent is stored at ``root/name``; a multi-file torrent at
``root/name/<path...>`` (:attr:`Storage.content_dir` is ``root`` or
``root/name``). The parser (``shoal.protocol.metainfo``) has already refused
unsafe paths; storage additionally opens files with ``O_NOFOLLOW``.

Files are created lazily, on the first block written into them, and are
sparse: bytes never written are holes. A file found larger than its length
when first opened for writing is truncated to its length. BEP 47 pad files
are never created: their bytes read as zeros and blocks written into them are
dropped. Zero-length files are created once the torrent is complete.
Symlink attributes (``l``) are not honoured (such a file is stored as a
regular file); ``x`` makes the file executable.

Blocks and pieces
-----------------

:meth:`Storage.write_block` writes a block at ``(index, begin)``, possibly
across file boundaries; a write into a piece already verified is ignored (in
endgame a block arrives twice, and a verified piece must never change).
:meth:`Storage.verify_piece` reads the piece back *from the files* and
compares its SHA-1 with the metainfo; on success the piece is marked
verified. :meth:`Storage.read_block` serves only verified pieces and raises
:class:`NotVerified` otherwise. Bounds on ``index``, ``begin`` and the length
(at most :data:`MAX_BLOCK_LENGTH`) are re-checked here as a last line of
defence and fail with :class:`BadBlock` (a ``ValueError``).

Resume data
-----------

:meth:`Storage.save_resume` writes a small bencoded dictionary atomically
(``daemons.runtime.state.atomic_write``) to :attr:`Storage.resume_path`
(by default ``root/.<hex info-hash>.shoal-resume``, or ``state_dir/<hex>.resume``)::

    format       "shoal-peer-resume"
    version      1
    info hash    20 bytes
    pieces       number of pieces
    bitfield     verified pieces, BEP 3 layout (piece 0 = high bit of byte 0)
    files        [[size, mtime_ns], ...] one per file of the metainfo;
                 [-1, 0] for a missing file, [0, 0] for pad and empty files

:meth:`Storage.load_resume` trusts the bitfield without hashing anything when
every file's ``(size, mtime_ns)`` is what was saved and the bitfield is
consistent with the file sizes; otherwise (missing, corrupt or foreign resume
file, any file changed) it runs :meth:`Storage.recheck`, which hashes every
piece whose bytes exist on disk and rebuilds the bitfield.

Crash safety
------------

Invariant: *after a crash at any moment (SIGKILL, power loss), the resume data
on disk claims no piece whose bytes are not durably on disk.*

1. A piece becomes verified only after its bytes were written and read back
   from the files and hashed (``write_block`` → ``verify_piece``).
2. ``save_resume`` first ``fsync``\\ s every file written since the last save
   (and, after a recheck, every file a verified piece lives in), then stats
   the files, then writes the resume file with ``atomic_write`` (temp file,
   fsync, rename, fsync of the directory). So every piece in the bitfield it
   writes is durable before the resume file naming it can exist; a crash
   inside ``save_resume`` leaves the previous resume file, which claims a
   subset.
3. Bytes of a piece the resume file claims are never written again.
   ``load_resume``/``recheck`` must run before any write (``write_block``
   refuses otherwise); afterwards the resume file on disk claims a subset of
   the pieces verified in memory (the trusted path loads exactly what the
   file says; a recheck saves fresh resume data before returning), and
   writes into pieces verified in memory are dropped. Truncation only cuts
   bytes beyond a file's length, which belong to no piece. So a piece
   durable at save time stays intact until the next save.

The verified flag in memory runs ahead of the resume data (pieces verified
since the last save); a crash loses only that progress, which a recheck
finds again from the page cache or re-downloads.

``mtime_ns`` is not needed for the invariant, it detects *outside* changes
(a file edited, replaced or deleted while we were stopped). Writes after a
save change mtimes, so after a crash the saved mtimes usually mismatch and we
recheck: that errs on the side of hashing. The common path, a clean shutdown
(``close()`` saves resume data last, after the last write), restarts without
hashing. If a write after a save happened to leave size and mtime unchanged
(coarse timestamps), trusting the bitfield is still correct by point 3.

Limits
------

* blocks: 1 .. :data:`MAX_BLOCK_LENGTH` (128 KiB; BEP 3 peers request 16 KiB);
* open descriptors: at most ``max_open_files`` (LRU), so torrents with many
  files do not exhaust the descriptor limit;
* a piece is hashed in memory: at most ``MAX_PARSE_PIECE_LENGTH`` (64 MiB);
* resume files larger than :data:`MAX_RESUME_SIZE` are ignored (recheck).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

from shoal.daemons.runtime import pieces
from shoal.daemons.runtime.state import atomic_write
from shoal.protocol import bencode
from shoal.protocol.errors import ProtocolError
from shoal.protocol.metainfo import Metainfo

__all__ = [
    "MAX_BLOCK_LENGTH",
    "StorageError",
    "BadBlock",
    "NotVerified",
    "Storage",
    "hash_files",
]

#: Largest block accepted by write_block/read_block: 8 × the 16 KiB every
#: client requests (BEP 3: implementations close connections asking for more).
MAX_BLOCK_LENGTH = 8 * 16 * 1024

#: Resume files hold ~16 bytes per file plus one bit per piece; 64 MiB covers
#: 100 000 files and millions of pieces with room to spare.
MAX_RESUME_SIZE = 64 * 1024 * 1024

RESUME_FORMAT = b"shoal-peer-resume"
RESUME_VERSION = 1

_READ_CHUNK = 1024 * 1024
# preadv2 flag: read only what the page cache holds (Linux 4.14+).
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


class StorageError(Exception):
    """Storage cannot do what was asked (closed, file vanished, ...)."""


class BadBlock(StorageError, ValueError):
    """A block outside its piece or the torrent, or of a forbidden length."""


class NotVerified(StorageError):
    """A read from a piece that has not been verified."""


class Storage:
    """The pieces of one torrent, stored in files under ``root``.

    Call :meth:`load_resume` once before writing (it rechecks when it must),
    and :meth:`close` (which saves resume data) at shutdown.
    """

    def __init__(
        self,
        metainfo: Metainfo,
        root: Path,
        *,
        state_dir: Path | None = None,
        resume_path: Path | None = None,
        max_open_files: int = 64,
    ) -> None:
        if max_open_files < 1:
            raise ValueError("max_open_files must be at least 1")
        self.metainfo = metainfo
        self.root = Path(root)
        self.content_dir = self.root if metainfo.single_file else self.root / metainfo.name
        hex_hash = metainfo.info_hash.hex()
        if resume_path is None:
            resume_path = (
                Path(state_dir) / f"{hex_hash}.resume"
                if state_dir is not None
                else self.root / f".{hex_hash}.shoal-resume"
            )
        self.resume_path = Path(resume_path)
        #: Number of piece hashes computed so far (tests and metrics read it).
        self.hashes_computed = 0

        self._n = metainfo.num_pieces
        self._have = bytearray((self._n + 7) // 8)
        self._count = 0
        # Files with bytes, in stream order, for offset -> file lookups.
        self._nonempty = [i for i, f in enumerate(metainfo.files) if f.length > 0]
        self._starts = [metainfo.files[i].offset for i in self._nonempty]
        self._paths = [self.content_dir.joinpath(*f.path) for f in metainfo.files]
        # file index -> (fd, writable), least recently used first.
        self._fds: OrderedDict[int, tuple[int, bool]] = OrderedDict()
        self._max_open = max_open_files
        self._truncated: set[int] = set()  # files checked for excess length
        self._dirty: set[int] = set()  # written (or rechecked) since the last fsync
        self._lock = threading.RLock()
        self._nowait = _RWF_NOWAIT != 0  # read_piece_nowait may try (the filesystem allows it)
        self._closed = False
        # Set by load_resume()/recheck(): until then the resume file on disk
        # may claim pieces memory does not know, so writes are refused.
        self._started = False

    # -- queries -------------------------------------------------------------

    @property
    def num_pieces(self) -> int:
        return self._n

    @property
    def num_verified(self) -> int:
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self._n

    def is_verified(self, index: int) -> bool:
        self._check_index(index)
        return bool(self._have[index >> 3] & (0x80 >> (index & 7)))

    def bitfield(self) -> bytes:
        """Verified pieces in BEP 3 layout (spare bits of the last byte zero)."""
        with self._lock:
            return bytes(self._have)

    def path_of(self, file_index: int) -> Path:
        return self._paths[file_index]

    # -- blocks ----------------------------------------------------------------

    def write_block(self, index: int, begin: int, data: bytes) -> bool:
        """Write ``data`` at ``begin`` in piece ``index``.

        Returns False (and writes nothing) when the piece is already verified.
        """
        with self._lock:
            self._check_started()
            self._check_block(index, begin, len(data))
            if self._bit(index):
                return False
            view = memoryview(data)
            pos = 0
            for fi, within, n in self._segments(index * self.metainfo.piece_length + begin, len(data)):
                if not self.metainfo.files[fi].pad:
                    fd = self._fd(fi, write=True)
                    _pwrite_all(fd, view[pos : pos + n], within)
                    self._dirty.add(fi)
                pos += n
            return True

    def write_piece(self, index: int, blocks: list[tuple[int, bytes]]) -> bool:
        """Hash a whole piece from memory and, if it matches, write it and mark it verified.

        ``blocks`` are ``(begin, data)`` covering the piece exactly. This is
        :meth:`write_block` for each block then :meth:`verify_piece`, without
        reading the piece back from the page cache to hash it. Data that
        fails its hash is not written. Returns whether it matched.
        """
        with self._lock:
            self._check_started()
            self._check_index(index)
            blocks = sorted(blocks, key=lambda b: b[0])
            size = self.metainfo.piece_size(index)
            pos = 0
            for begin, data in blocks:
                if begin != pos:
                    raise ValueError(f"piece {index}: blocks do not cover it (gap or overlap at {pos})")
                pos += len(data)
            if pos != size:
                raise ValueError(f"piece {index}: blocks cover {pos} of {size} bytes")
            if self._bit(index):
                return True
            data = b"".join(b for _, b in blocks)
            self.hashes_computed += 1
            if hashlib.sha1(data).digest() != self.metainfo.piece_hash(index):
                return False
            view = memoryview(data)
            pos = 0
            for fi, within, n in self._piece_segments(index):
                if not self.metainfo.files[fi].pad:
                    _pwrite_all(self._fd(fi, write=True), view[pos:pos + n], within)
                    self._dirty.add(fi)
                pos += n
            self._set(index)
            if self.complete:
                self._create_empty_files()
            return True

    def read_block(self, index: int, begin: int, length: int) -> bytes:
        """The bytes of a verified piece; :class:`NotVerified` otherwise."""
        with self._lock:
            self._check_open()
            self._check_block(index, begin, length)
            if not self._bit(index):
                raise NotVerified(f"piece {index} is not verified")
            data = self._read(index * self.metainfo.piece_length + begin, length)
            if data is None:
                raise StorageError(f"bytes of verified piece {index} are missing from disk")
            return data

    def read_piece(self, index: int) -> bytes:
        """All the bytes of verified piece ``index`` (one call instead of one per block)."""
        with self._lock:
            self._check_open()
            self._check_index(index)
            if not self._bit(index):
                raise NotVerified(f"piece {index} is not verified")
            data = self._read(index * self.metainfo.piece_length, self.metainfo.piece_size(index))
            if data is None:
                raise StorageError(f"bytes of verified piece {index} are missing from disk")
            return data

    def read_piece_nowait(self, index: int) -> memoryview | None:
        """Verified piece ``index`` if it can be had now without waiting; else None.

        The trio daemon calls this on its event loop: it reads with
        ``preadv2(RWF_NOWAIT)``, which copies what the page cache holds and
        fails instead of going to the disk. None means "not all cached, a
        file not open yet, or a worker thread holds the storage": the caller
        then reads with :meth:`read_piece` in a thread. A thread hop per
        piece cost more CPU than serving the piece (issue 13 item 7).
        """
        if not self._nowait or not self._lock.acquire(blocking=False):
            return None
        try:
            self._check_open()
            self._check_index(index)
            if not self._bit(index):
                raise NotVerified(f"piece {index} is not verified")
            buf = bytearray(self.metainfo.piece_size(index))  # zeros: pad files need nothing more
            view = memoryview(buf)
            pos = 0
            for fi, within, n in self._piece_segments(index):
                end = pos + n
                if not self.metainfo.files[fi].pad:
                    entry = self._fds.get(fi)
                    if entry is None:
                        return None  # opening a file may wait on the disk
                    while pos < end:
                        try:
                            got = os.preadv(entry[0], [view[pos:end]], within, _RWF_NOWAIT)
                        except BlockingIOError:
                            return None
                        except OSError as exc:
                            if exc.errno != errno.EOPNOTSUPP:
                                raise
                            self._nowait = False  # tmpfs, some FUSE: the thread path always
                            return None
                        if got <= 0:
                            return None  # short file: read_piece says so
                        pos += got
                        within += got
                pos = end
            return view
        finally:
            self._lock.release()

    def verify_piece(self, index: int) -> bool:
        """Hash piece ``index`` as stored on disk; mark it verified on a match."""
        with self._lock:
            self._check_open()
            self._check_index(index)
            if self._bit(index):
                return True
            if not self._hash_ok(index):
                return False
            self._set(index)
            if self.complete:
                self._create_empty_files()
            return True

    # -- resume data ---------------------------------------------------------------

    def sync(self) -> None:
        """fsync every file written since the last sync."""
        with self._lock:
            self._check_open()
            for fi in sorted(self._dirty):
                # A file deleted under us: its pieces fail load_resume's size check.
                with contextlib.suppress(FileNotFoundError):
                    os.fsync(self._fd(fi, write=False))
            self._dirty.clear()

    def save_resume(self) -> None:
        """fsync the data, then atomically write the resume file (see module doc)."""
        with self._lock:
            self._check_started()
            self.sync()
            files = []
            for i, f in enumerate(self.metainfo.files):
                files.append([0, 0] if f.pad or f.length == 0 else list(self._stat(i)))
            record = {
                b"format": RESUME_FORMAT,
                b"version": RESUME_VERSION,
                b"info hash": self.metainfo.info_hash,
                b"pieces": self._n,
                b"bitfield": bytes(self._have),
                b"files": files,
            }
            self.resume_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.resume_path, bencode.encode(record))

    def load_resume(self) -> bool:
        """Restore the verified pieces at start.

        Returns True when the saved bitfield was trusted without hashing,
        False when a recheck was needed (and done).
        """
        with self._lock:
            self._check_open()
            have = self._trusted_bitfield()
            if have is None:
                self.recheck()  # also saves fresh resume data
                return False
            self._started = True
            self._have[:] = have
            self._count = sum(bin(b).count("1") for b in have)
            if self.complete:
                self._create_empty_files()
            return True

    def recheck(self) -> int:
        """Hash every piece whose bytes exist, rebuild the bitfield, save resume data.

        Returns the number of verified pieces.
        """
        with self._lock:
            self._check_open()
            self._started = True
            self._have[:] = bytes(len(self._have))
            self._count = 0
            sizes = [self._stat(i)[0] for i in range(len(self.metainfo.files))]
            for index in range(self._n):
                if self._present(index, sizes) and self._hash_ok(index):
                    self._set(index)
            # The bytes just read may still be only in the page cache (a
            # killed process's writes survive it, a power cut's do not):
            # sync them before any resume file claims them.
            for index in range(self._n):
                if self._bit(index):
                    self._dirty.update(
                        fi for fi, _, _ in self._piece_segments(index) if not self.metainfo.files[fi].pad
                    )
            if self.complete:
                self._create_empty_files()
            # From here on the resume file on disk claims exactly what memory
            # does (crash-safety point 3).
            self.save_resume()
            return self._count

    # -- lifecycle -------------------------------------------------------------------

    def close(self, *, save_resume: bool = True) -> None:
        """Save resume data (by default) and close every file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if save_resume and self._started:
                    self.save_resume()
            finally:
                self._closed = True
                while self._fds:
                    _, (fd, _) = self._fds.popitem(last=False)
                    os.close(fd)

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("storage is closed")

    def _check_started(self) -> None:
        self._check_open()
        if not self._started:
            raise StorageError("call load_resume() (or recheck()) before writing")

    def _check_index(self, index: int) -> None:
        if type(index) is not int or not 0 <= index < self._n:
            raise BadBlock(f"piece index {index!r} outside 0..{self._n - 1}")

    def _check_block(self, index: int, begin: int, length: int) -> None:
        self._check_index(index)
        if type(begin) is not int or type(length) is not int:
            raise BadBlock("begin and length must be integers")
        if not 0 < length <= MAX_BLOCK_LENGTH:
            raise BadBlock(f"block length {length} outside 1..{MAX_BLOCK_LENGTH}")
        size = self.metainfo.piece_size(index)
        if begin < 0 or begin + length > size:
            raise BadBlock(f"block {begin}+{length} outside piece {index} of {size} bytes")

    def _bit(self, index: int) -> bool:
        return bool(self._have[index >> 3] & (0x80 >> (index & 7)))

    def _set(self, index: int) -> None:
        self._have[index >> 3] |= 0x80 >> (index & 7)
        self._count += 1

    def _segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(file index, offset in file, byte count)`` covering the stream range."""
        k = bisect.bisect_right(self._starts, offset) - 1
        files = self.metainfo.files
        while length > 0:
            fi = self._nonempty[k]
            f = files[fi]
            within = offset - f.offset
            n = min(length, f.length - within)
            yield fi, within, n
            offset += n
            length -= n
            k += 1

    def file_ranges(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(file index, offset in file, byte count)`` covering bytes [offset, offset+length) of the torrent."""
        return self._segments(offset, length)

    def _piece_segments(self, index: int) -> Iterator[tuple[int, int, int]]:
        return self._segments(index * self.metainfo.piece_length, self.metainfo.piece_size(index))

    def _fd(self, fi: int, *, write: bool) -> int:
        """A descriptor for file ``fi`` (LRU-cached); raises FileNotFoundError when reading a missing file."""
        entry = self._fds.get(fi)
        if entry is not None and (entry[1] or not write):
            self._fds.move_to_end(fi)
            return entry[0]
        if entry is not None:  # read-only, now needed for writing
            os.close(self._fds.pop(fi)[0])
        path = self._paths[fi]
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            mode = 0o755 if "x" in self.metainfo.files[fi].attr else 0o644
            fd = os.open(path, flags | os.O_RDWR | os.O_CREAT, mode)
            if fi not in self._truncated:
                if os.fstat(fd).st_size > self.metainfo.files[fi].length:
                    os.ftruncate(fd, self.metainfo.files[fi].length)
                self._truncated.add(fi)
        else:
            fd = os.open(path, flags | os.O_RDONLY)
        while len(self._fds) >= self._max_open:
            _, (old, _) = self._fds.popitem(last=False)
            os.close(old)
        self._fds[fi] = (fd, write)
        return fd

    def _read(self, offset: int, length: int) -> bytes | None:
        """The stream bytes ``[offset, offset + length)``, or None if any is missing."""
        out = bytearray()
        for fi, within, n in self._segments(offset, length):
            if self.metainfo.files[fi].pad:
                out += bytes(n)
                continue
            try:
                fd = self._fd(fi, write=False)
            except FileNotFoundError:
                return None
            while n > 0:
                chunk = os.pread(fd, min(n, _READ_CHUNK), within)
                if not chunk:
                    return None  # file shorter than the piece needs
                out += chunk
                within += len(chunk)
                n -= len(chunk)
        return bytes(out)

    def _hash_ok(self, index: int) -> bool:
        data = self._read(index * self.metainfo.piece_length, self.metainfo.piece_size(index))
        if data is None:
            return False
        self.hashes_computed += 1
        return hashlib.sha1(data).digest() == self.metainfo.piece_hash(index)

    def _stat(self, fi: int) -> tuple[int, int]:
        try:
            st = os.stat(self._paths[fi], follow_symlinks=False)
        except FileNotFoundError:
            return (-1, 0)
        return (st.st_size, st.st_mtime_ns)

    def _present(self, index: int, sizes: Sequence[int]) -> bool:
        """Whether every stored byte of piece ``index`` lies inside its file's current size."""
        files = self.metainfo.files
        return all(files[fi].pad or within + n <= sizes[fi] for fi, within, n in self._piece_segments(index))

    def _trusted_bitfield(self) -> bytes | None:
        """The saved bitfield if it can be trusted as it is, else None."""
        try:
            if self.resume_path.stat().st_size > MAX_RESUME_SIZE:
                return None
            record = bencode.decode(self.resume_path.read_bytes(), max_size=MAX_RESUME_SIZE)
        except (OSError, ProtocolError):
            return None
        files = self.metainfo.files
        if (
            type(record) is not dict
            or record.get(b"format") != RESUME_FORMAT
            or record.get(b"version") != RESUME_VERSION
            or record.get(b"info hash") != self.metainfo.info_hash
            or record.get(b"pieces") != self._n
        ):
            return None
        have = record.get(b"bitfield")
        saved = record.get(b"files")
        if (type(have) is not bytes or len(have) != len(self._have)
                or type(saved) is not list or len(saved) != len(files)):
            return None
        if self._n % 8 and have[-1] & (0xFF >> (self._n % 8)):
            return None  # spare bits set
        sizes = []
        for i, f in enumerate(files):
            entry = saved[i]
            if type(entry) is not list or len(entry) != 2 or not all(type(v) is int for v in entry):
                return None
            if f.pad or f.length == 0:
                sizes.append(0)
                continue
            now = self._stat(i)
            if tuple(entry) != now:
                return None
            sizes.append(now[0])
        # A bitfield claiming bytes beyond a file's end is inconsistent: recheck.
        for index in range(self._n):
            if have[index >> 3] & (0x80 >> (index & 7)) and not self._present(index, sizes):
                return None
        return have

    def _create_empty_files(self) -> None:
        for i, f in enumerate(self.metainfo.files):
            if f.length == 0 and not f.pad and not os.path.lexists(self._paths[i]):
                self._paths[i].parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(self._paths[i], os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def hash_files(directory: Path, files: Sequence[tuple], piece_length: int) -> bytes:
    """:func:`shoal.daemons.runtime.pieces.hash_files`, a size mismatch raised as :class:`StorageError`."""
    try:
        return pieces.hash_files(directory, files, piece_length)
    except pieces.LengthMismatch as exc:
        raise StorageError(str(exc)) from None
