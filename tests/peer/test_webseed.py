"""Web seeds (BEP 19): a torrent downloads from plain HTTP servers, hash-checked.

The HTTP server is the runtime's own (h11), with a handler that serves byte
ranges of files under a folder, as any static web server does.
"""

import logging
import re
import urllib.parse
from functools import partial
from pathlib import Path

import trio

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.http import HttpResponse, serve_http
from shoal.demo.realclients import make_shared_file
from shoal.protocol.metainfo import create_metainfo, hash_pieces, parse_metainfo

from .conftest import next_client_ip, sha1

RANGE = re.compile(rb"^bytes=(\d+)-(\d+)$")


def range_handler(root: Path, log: list, corrupt: bool = False, served: trio.Event | None = None):
    async def handle(req):
        path = root / urllib.parse.unquote(req.target.decode()).lstrip("/")
        if not path.is_file():
            return HttpResponse(404, body=b"no such file")
        data = path.read_bytes()
        m = RANGE.match(req.header(b"range", b""))
        if not m:
            return HttpResponse(200, body=data)
        a, b = int(m[1]), int(m[2])
        log.append((req.target.decode(), a, b))
        body = data[a:b + 1]
        if corrupt:
            body = bytes(x ^ 0xFF for x in body)
        if served is not None:
            served.set()
        return HttpResponse(206, [(b"content-range", f"bytes {a}-{b}/{len(data)}".encode())], body)
    return handle


async def web_server(nursery, root: Path, log: list, corrupt=False, served=None) -> str:
    addr = await nursery.start(partial(serve_http, range_handler(root, log, corrupt, served),
                                       ListenAddr(next_client_ip(), 0),
                                       max_request_bytes=16384))
    return f"http://{addr.host}:{addr.port}"


async def test_single_file_torrent_downloads_from_a_web_seed_alone(lab, tmp_path, nursery):
    log: list = []
    base = await web_server(nursery, tmp_path / "www", log)
    shared = make_shared_file(tmp_path / "www" / "files", "data.bin", 3 << 20, "http://127.0.0.1:1/announce")
    raw = parse_metainfo(shared.torrent.read_bytes())
    # url-list names the file itself (BEP 19's single-file form)
    data, _ = create_metainfo("data.bin", [(("data.bin",), raw.total_length)], raw.piece_length, raw.pieces,
                              [["http://127.0.0.1:1/announce"]], url_list=[f"{base}/files/data.bin"])
    meta = parse_metainfo(data)
    with trio.fail_after(30):
        session = await lab.peer()
        t = await session.add(meta)
        await t.completed.wait()
    assert sha1(t.save_dir / "data.bin") == sha1(shared.path)
    assert session.metrics.webseed_bytes._value.get() == meta.total_length
    assert log and all(target == "/files/data.bin" for target, _a, _b in log)


async def test_multi_file_torrent_maps_paths_under_a_directory_url(lab, tmp_path, nursery):
    log: list = []
    base = await web_server(nursery, tmp_path / "www", log)
    root = tmp_path / "www" / "mirror" / "set"
    (root / "sub dir").mkdir(parents=True)
    files = {("a.bin",): bytes(range(256)) * 700, ("sub dir", "b c.bin"): b"shoal" * 50_000}
    for path, content in files.items():
        root.joinpath(*path).write_bytes(content)
    stream = b"".join(files.values())
    data, _ = create_metainfo("set", [(p, len(c)) for p, c in files.items()], 32768, hash_pieces(stream, 32768),
                              [["http://127.0.0.1:1/announce"]], url_list=[f"{base}/mirror/"])
    meta = parse_metainfo(data)
    with trio.fail_after(30):
        t = await (await lab.peer()).add(meta)
        await t.completed.wait()
    for path, content in files.items():
        assert t.save_dir.joinpath("set", *path).read_bytes() == content
    # a piece that spans both files was fetched as two ranges, one per file
    assert {target for target, _a, _b in log} == {"/mirror/set/a.bin", "/mirror/set/sub%20dir/b%20c.bin"}


async def test_a_web_seed_serving_bad_data_is_dropped_and_peers_finish_the_job(lab, tmp_path, nursery):
    log: list = []
    tracker = await lab.tracker()
    served = trio.Event()
    base = await web_server(nursery, tmp_path / "www", log, corrupt=True, served=served)
    shared = make_shared_file(tmp_path / "www", "data.bin", 2 << 20, f"http://{tracker['http']}/announce")
    raw = parse_metainfo(shared.torrent.read_bytes())
    data, _ = create_metainfo("data.bin", [(("data.bin",), raw.total_length)], raw.piece_length, raw.pieces,
                              [[f"http://{tracker['http']}/announce"]], url_list=[f"{base}/"])
    meta = parse_metainfo(data)
    with trio.fail_after(30):
        session = await lab.peer()
        t = await session.add(meta)
        await served.wait()
        await (await lab.peer()).add(meta, shared.path.parent)  # an honest seeder joins
        await t.completed.wait()
    assert sha1(t.save_dir / "data.bin") == sha1(shared.path)
    assert session.metrics.failed._value.get() >= 1
    # dropped after its first bad piece: it delivered at most one fetch's worth
    assert session.metrics.webseed_bytes._value.get() <= 1 << 20


async def test_a_web_seed_asks_for_nothing_while_a_disk_error_pauses_requests(lab, tmp_path, nursery):
    """Before: the web seed picked blocks from the picker itself, so after a disk error it kept
    fetching (and failing to write) while the torrent's peers waited out the pause."""
    log: list = []
    asked: list[float] = []  # when each range request reached the server
    inner = range_handler(tmp_path / "www", log)

    async def handler(req):
        asked.append(trio.current_time())
        return await inner(req)

    addr = await nursery.start(partial(serve_http, handler, ListenAddr(next_client_ip(), 0), max_request_bytes=16384))
    shared = make_shared_file(tmp_path / "www" / "files", "data.bin", 3 << 20, "http://127.0.0.1:1/announce",
                              piece_length=64 * 1024)
    raw = parse_metainfo(shared.torrent.read_bytes())
    data, _ = create_metainfo("data.bin", [(("data.bin",), raw.total_length)], raw.piece_length, raw.pieces,
                              [["http://127.0.0.1:1/announce"]],
                              url_list=[f"http://{addr.host}:{addr.port}/files/data.bin"])
    session = await lab.peer()
    t = await session.add(parse_metainfo(data))
    target = t.save_dir / "data.bin"
    target.mkdir(parents=True)  # the file cannot be opened for writing: every write fails
    pauses: list[tuple[float, float]] = []
    second = trio.Event()

    class Pauses(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "no new requests for" in record.getMessage():
                pauses.append((trio.current_time(), t.core.paused_until))
                if len(pauses) == 2:
                    second.set()

    logger = logging.getLogger("shoal.peer")
    handler_ = Pauses(logging.ERROR)
    logger.addHandler(handler_)
    try:
        with trio.fail_after(30):
            await second.wait()  # the first pause is over: the second began after it
            target.rmdir()  # the disk works again
            await t.completed.wait()
    finally:
        logger.removeHandler(handler_)
    begin, end = pauses[0]
    during = [a for a in asked if begin < a < end]
    assert end - begin >= 0.9 and len(during) <= 1, (end - begin, len(during))  # at most the one in flight
    assert sha1(target) == sha1(shared.path)
    assert session.metrics.disk_errors._value.get() >= 2
