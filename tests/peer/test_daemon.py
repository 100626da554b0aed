"""The peer daemon as systemd runs it, driven through the `shoal` CLI.

`shoal peer create` makes the .torrent, `shoal peer add` hands it to the
running daemon over its control socket, the daemon downloads from a shoal
seeder through a shoal tracker, `shoal peer status` shows it, and after a
graceful restart the daemon seeds again from its library without
downloading anything.
"""

import subprocess
import sys

import trio

from shoal.daemons.runtime.rpc import connect_unix
from shoal.protocol.metainfo import parse_metainfo
from tests.harness import start_daemon

from .conftest import next_client_ip, sha1

SHOAL = [sys.executable, "-m", "shoal.cli.main"]


async def shoal(*args: str) -> subprocess.CompletedProcess:
    r = await trio.run_process([*SHOAL, *args], capture_stdout=True, capture_stderr=True, check=False)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def write_config(path, tmp, ip):
    path.write_text(f"""
[daemon]
metrics_listen = "127.0.0.1:0"
stop_timeout = 5.0
[peer]
listen = "{ip}:0"
download_dir = "{tmp / 'downloads'}"
control_socket = "{tmp / 'control.sock'}"
""")
    return path


async def test_daemon_downloads_what_the_cli_adds_and_seeds_again_after_restart(lab, tmp_path):
    with trio.fail_after(120):
        tracker = await lab.tracker()
        data = tmp_path / "seed" / "dataset"
        data.mkdir(parents=True)
        (data / "a.bin").write_bytes(bytes(range(256)) * 4096)
        (data / "sub").mkdir()
        (data / "sub" / "b.bin").write_bytes(b"shoal" * 300_001)
        torrent = tmp_path / "dataset.torrent"
        made = await shoal("peer", "create", str(data), "--tracker", f"http://{tracker['http']}/announce",
                           "-o", str(torrent))
        assert made.returncode == 0, made.stderr
        meta = parse_metainfo(torrent.read_bytes())
        assert [f.path for f in meta.files] == [("a.bin",), ("sub", "b.bin")]
        await (await lab.peer()).add(meta, data.parent)

        state = tmp_path / "state"
        config = write_config(tmp_path / "peer.toml", tmp_path, next_client_ip())
        argv = [*SHOAL, "peer", "run", "--config", str(config)]
        sock = str(tmp_path / "control.sock")
        async with await start_daemon(argv, state_dir=state) as d:
            added = await shoal("peer", "add", str(torrent), "--socket", sock)
            assert added.returncode == 0, added.stderr
            assert meta.info_hash.hex() in added.stdout
            async with await connect_unix(sock) as rpc:
                done = await rpc.call("wait", {"info_hash": meta.info_hash.hex()}, timeout=60)
            assert done["state"] == "seeding" and done["left"] == 0
            for f in ("a.bin", "sub/b.bin"):
                assert sha1(tmp_path / "downloads" / "dataset" / f) == sha1(data / f)
            status = await shoal("peer", "status", "--socket", sock)
            assert "100.0%" in status.stdout and "seeding" in status.stdout
            assert status.stdout.startswith(meta.info_hash.hex()[:8])
            again = await shoal("peer", "add", str(torrent), "--socket", sock)
            assert again.returncode == 0 and again.stdout.startswith("already added dataset"), again.stdout
            assert await d.terminate() == 0

        # Restart: the torrent comes back from the library, already complete.
        async with await start_daemon(argv, state_dir=state) as d:
            async with await connect_unix(sock) as rpc:
                (row,) = await rpc.call("status")
            assert row["state"] == "seeding" and row["downloaded"] == 0
            limited = await shoal("peer", "limit", "dataset", "--upload-rate", "65536", "--socket", sock)
            assert limited.returncode == 0 and "upload limit 65536" in limited.stdout, limited.stderr
            assert (state / "torrents" / f"{meta.info_hash.hex()}.limits").read_text().split() == ["65536", "0"]
            bad = await shoal("peer", "limit", "dataset", "--upload-rate", "-5", "--socket", sock)
            assert bad.returncode == 2 and "upload_rate must be an integer" in bad.stderr
            streamed = await shoal("peer", "stream", "dataset", "--rate", "1000000", "--socket", sock)
            assert streamed.returncode == 0 and "0 pieces now have deadlines" in streamed.stdout
            bad = await shoal("peer", "stream", "dataset", "--rate", "1000", "--offset", "99999999", "--socket", sock)
            assert bad.returncode == 2 and "offset must be inside the torrent" in bad.stderr
            removed = await shoal("peer", "remove", "dataset", "--socket", sock)
            assert removed.returncode == 0 and "removed" in removed.stdout
            async with await connect_unix(sock) as rpc:
                assert await rpc.call("status") == []
            assert await d.terminate() == 0


async def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.torrent"
    bad.write_bytes(b"d4:infod4:name0:ee")
    r = await shoal("get", str(bad))
    assert r.returncode == 2 and "not a valid .torrent" in r.stderr
    r = await shoal("peer", "add", str(bad), "--socket", str(tmp_path / "nope.sock"))
    assert r.returncode == 2 and "cannot reach the peer daemon" in r.stderr
    r = await shoal("get", "magnet:?xt=urn:btih:nothex")
    assert r.returncode == 2 and "not a valid .torrent or magnet link" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


async def test_daemon_fetches_a_magnet_links_metadata_from_peers(lab, tmp_path):
    """`shoal peer add MAGNET`: the info dictionary comes from a shoal seeder
    over BEP 9, is kept in the library, and the download follows."""
    with trio.fail_after(90):
        tracker = await lab.tracker()
        data = tmp_path / "seed" / "set"
        data.mkdir(parents=True)
        (data / "x.bin").write_bytes(bytes(range(251)) * 60_000)  # 919 pieces of 16 KiB
        (data / "y.bin").write_bytes(b"y" * 70_000)
        torrent = tmp_path / "set.torrent"
        made = await shoal("peer", "create", str(data), "--tracker", f"http://{tracker['http']}/announce",
                           "--piece-length", "16384", "-o", str(torrent))
        assert made.returncode == 0, made.stderr
        meta = parse_metainfo(torrent.read_bytes())
        assert len(meta.raw_info) > 16384  # the metadata itself comes in several BEP 9 pieces
        await (await lab.peer()).add(meta, data.parent)

        state = tmp_path / "state"
        config = write_config(tmp_path / "peer.toml", tmp_path, next_client_ip())
        sock = str(tmp_path / "control.sock")
        async with await start_daemon([*SHOAL, "peer", "run", "--config", str(config)], state_dir=state) as d:
            added = await shoal("peer", "add", meta.magnet().uri(), "--socket", sock)
            assert added.returncode == 0, added.stderr
            assert "metadata" in added.stdout
            async with await connect_unix(sock) as rpc:
                done = await rpc.call("wait", {"info_hash": meta.info_hash.hex()}, timeout=60)
            assert done["state"] == "seeding" and done["name"] == "set"
            for f in ("x.bin", "y.bin"):
                assert sha1(tmp_path / "downloads" / "set" / f) == sha1(data / f)
            library = sorted(p.name for p in (state / "torrents").iterdir())
            assert library == [f"{meta.info_hash.hex()}.torrent"]
            kept = parse_metainfo((state / "torrents" / library[0]).read_bytes())
            assert kept.raw_info == meta.raw_info and kept.trackers == meta.trackers
            assert await d.terminate() == 0


async def test_kill_9_mid_download_resumes_without_fetching_verified_pieces(lab, tmp_path):
    with trio.fail_after(120):
        tracker = await lab.tracker()
        data = tmp_path / "seed" / "big.bin"
        data.parent.mkdir(parents=True)
        data.write_bytes(bytes(range(251)) * (24 * 1024))  # about 6 MiB
        torrent = tmp_path / "big.torrent"
        made = await shoal("peer", "create", str(data), "--tracker", f"http://{tracker['http']}/announce",
                           "-o", str(torrent), "--piece-length", str(256 * 1024))
        assert made.returncode == 0, made.stderr
        meta = parse_metainfo(torrent.read_bytes())
        # The seed uploads at 1 MiB/s, so the download takes several seconds.
        await (await lab.peer(upload_rate=1 << 20)).add(meta, data.parent)

        state = tmp_path / "state"
        config = write_config(tmp_path / "peer.toml", tmp_path, next_client_ip())
        argv = [*SHOAL, "peer", "run", "--config", str(config)]
        sock = str(tmp_path / "control.sock")
        ih = meta.info_hash.hex()
        async with await start_daemon(argv, state_dir=state) as d:
            assert (await shoal("peer", "add", str(torrent), "--socket", sock)).returncode == 0
            async with await connect_unix(sock) as rpc:
                half = await rpc.call("wait", {"info_hash": ih, "pieces": meta.num_pieces // 2}, timeout=60)
            assert half["state"] == "downloading"
            await d.kill()
        have_before = half["have"]

        async with await start_daemon(argv, state_dir=state) as d:
            async with await connect_unix(sock) as rpc:
                done = await rpc.call("wait", {"info_hash": ih}, timeout=60)
            assert done["state"] == "seeding"
            assert sha1(tmp_path / "downloads" / "big.bin") == sha1(data)
            # Pieces verified before the kill were recovered from disk, not fetched again.
            fetched_again = done["downloaded"]
            assert fetched_again <= meta.total_length - have_before * meta.piece_length + 2 * meta.piece_length
            assert await d.terminate() == 0
