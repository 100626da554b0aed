"""A disk error while a piece is written costs that piece's blocks, never the download.

The fault is real: a directory stands where the downloaded file goes, so
opening it for writing fails with EISDIR in the write thread, as a full or
broken disk would fail the write; removing the directory is the disk
working again.
"""

import logging

import trio

from shoal.demo.realclients import make_shared_file
from shoal.protocol.metainfo import parse_metainfo

from .conftest import sha1


class _FirstError(logging.Handler):
    """Sets ``seen`` at the first error logged (on the event loop, where the torrent logs)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen = trio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.seen.set()


async def test_a_piece_whose_write_fails_is_fetched_again_once_the_disk_works(lab, tmp_path):
    """Before: the picker went on counting the failed piece's blocks as received,
    so it was never requested again and the download never completed."""
    shared = make_shared_file(tmp_path / "seed", "data.bin", 1 << 20, "http://127.0.0.1:1/announce",
                              piece_length=64 * 1024)
    meta = parse_metainfo(shared.torrent.read_bytes())
    seeder = await lab.peer()
    seed = await seeder.add(meta, shared.path.parent)
    assert seed.state == "seeding"
    session = await lab.peer()
    leech = await session.add(meta)
    target = leech.save_dir / "data.bin"
    target.mkdir(parents=True)  # the file cannot be opened for writing
    errors = _FirstError()
    logger = logging.getLogger("shoal.peer")
    logger.addHandler(errors)
    try:
        with trio.fail_after(20):
            leech.add_addresses([(seeder.listen_addr.host, seeder.listen_addr.port)])
            await errors.seen.wait()
            target.rmdir()  # the disk works again
            await leech.completed.wait()
    finally:
        logger.removeHandler(errors)
    assert sha1(target) == sha1(shared.path)
    assert "writing piece" in errors.messages[0] and "\n" not in errors.messages[0]  # one line
    assert session.metrics.disk_errors._value.get() >= 1
    assert session.metrics.failed._value.get() == 0  # a disk error is no hash failure
    assert session.metrics.offences.labels("bad_hash")._value.get() == 0  # and blames nobody
