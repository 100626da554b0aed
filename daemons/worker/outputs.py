"""Data between tasks: a worker publishes its tasks' declared outputs and fetches other tasks' ones.

Theory of operation
-------------------
A task may name another task's output as an input, ``task:A/result.npy``
(:mod:`shoal.core.dispatch.jobs`; A becomes a dependency). When A finishes,
its worker **publishes** A's declared outputs, which stay where A left them
(``<work_dir>/<job>/A/``):

* on its **output server**, plain HTTP/1.1 (the runtime's :func:`serve_http`)
  on ``outputs_listen``: ``GET /<job>/<task>/<path>`` with
  ``Authorization: Bearer <secret>``, a random secret made for that task and
  sent only to the dispatcher (in the result's ``source``; ``shoal job`` does
  not show it), which hands it to the consumers in their leases. Every
  response is one ``Range`` of at most :data:`CHUNK` bytes, so a big output
  never sits in memory; anything else is 400/403/404 and counted;
* in the **swarm**, with ``publish_tracker`` and ``peer_socket`` set: the
  worker makes a .torrent of each output and adds it to its peer, which seeds
  it from A's directory; the result carries each output's magnet link.

The consumer's worker **fetches** each ``task:`` input before the task starts
into ``<its task dir>/A/result.npy`` (the producer's name keeps fan-in inputs
apart): from its own work directory if A ran here, else by magnet link
through its peer (the swarm: seeders other than A's worker count too), else,
or when the swarm fails, from A's output server. Whatever the way, the file
must have the size and SHA-256 A's worker recorded, or the task fails with
an input error saying so (a wrong input is never handed to a task).

**Retention.** Published outputs live until their job ends plus
``output_retention`` seconds: every heartbeat lists the jobs this worker keeps
outputs for, the reply names those that ended, and a sweep removes their
directories (and their torrents from the peer) once the period is over.

**Restarts.** What is published (each task's secret, directory and outputs) is
kept in ``<state directory>/outputs.json`` (mode 0600), written before the
result that carries the secret is reported, so a worker restarted, even after
``kill -9``, serves the outputs it had published (on the same ``outputs_listen``
address: the dispatcher keeps the URL it was given). An entry whose directory
is gone is dropped at start; an unreadable file is logged in one line and the
worker starts with nothing published, and a consumer that needs those outputs
fails loudly (``input: ...``), as when a file was tampered with.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.http import HttpRequest, HttpResponse, serve_http
from shoal.daemons.runtime.state import StateSaver
from shoal.protocol.dispatch import FetchSource

log = logging.getLogger("shoal.worker")

__all__ = ["CHUNK", "OutputServer", "fetch_task_input"]

CHUNK = 4 << 20  # bytes in one response: a range request at a time keeps memory flat
MAX_REQUEST = 8192  # a GET with its headers
FETCH_TIMEOUT = 60.0  # seconds for one chunk


@dataclass(slots=True)
class _Published:
    secret: str
    directory: Path
    outputs: dict[str, int]  # path -> size
    info_hashes: list[str] = field(default_factory=list)


class OutputServer:
    """The worker's published outputs: served over HTTP, seeded by the peer, swept after retention."""

    def __init__(self, work_dir: Path, *, retention: float, public_url: str = "", tracker: str = "",
                 swarm: Any = None, metrics: Any = None, state_file: Path | None = None,
                 daemon_metrics: Any = None) -> None:
        self.work_dir = work_dir
        self.state_file = state_file
        # the runtime's state saver: saves counted in shoal_worker_state_saves_total{what="published_outputs"}
        self.saver = None if state_file is None else StateSaver(
            "published_outputs", state_file, self._snapshot, 0.0, metrics=daemon_metrics, log=log)
        self.retention = retention
        self.public_url = public_url
        self.tracker = tracker
        self.swarm = swarm  # the SwarmHook (its peer_socket), for seeding
        self.metrics = metrics
        self.url = ""  # set once serving
        self.published: dict[tuple[int, str], _Published] = {}
        self.expiry: dict[int, float] = {}  # job -> when its outputs go
        self._load()

    # -- what is published, on disk ------------------------------------------------------

    def _load(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            entries = json.loads(self.state_file.read_bytes())
            for e in entries:
                pub = _Published(str(e["secret"]), Path(e["directory"]),
                                 {str(k): int(v) for k, v in e["outputs"].items()}, [str(h) for h in e["info_hashes"]])
                if pub.directory.is_dir():
                    self.published[int(e["job"]), str(e["task"])] = pub
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self.published.clear()
            log.error("published outputs not restored from %s (%s): none are served until published again",
                      self.state_file, exc)
            return
        if self.published:
            log.info("restored %d published task outputs from %s", len(self.published), self.state_file)

    def _snapshot(self) -> bytes:
        return json.dumps([{"job": job, "task": task, "secret": p.secret, "directory": str(p.directory),
                            "outputs": p.outputs, "info_hashes": p.info_hashes}
                           for (job, task), p in self.published.items()]).encode()

    async def _save(self) -> None:
        """On disk before a result with a secret is reported; a failure is logged and counted by the
        saver, and the outputs are still served until a restart."""
        if self.saver is not None:
            await self.saver.save()

    async def serve(self, listen: ListenAddr, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(partial(serve_http, self.handle, listen, max_request_bytes=MAX_REQUEST,
                                               idle_timeout=30.0, on_error=self._count))
            self.url = self.public_url.rstrip("/") or f"http://{addr}"
            log.info("task outputs served on %s", self.url)
            task_status.started(addr)

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.output_refused.labels(reason).inc()

    # -- publishing ------------------------------------------------------------------

    def jobs(self) -> list[int]:
        """The jobs this worker keeps outputs for (the heartbeat asks which of them ended)."""
        return sorted({job for job, _t in self.published} - set(self.expiry))

    async def publish(self, job: int, task: str, cwd: Path, outputs: list[list[Any]]) -> dict[str, Any] | None:
        """Publish a finished task's outputs; the result's ``source`` (None when nothing to serve)."""
        if not outputs or not self.url:
            return None
        pub = _Published(secrets.token_hex(16), cwd, {str(o[0]): int(o[1]) for o in outputs})
        self.published[job, task] = pub
        magnets: dict[str, str] = {}
        if self.tracker and self.swarm is not None and self.swarm.socket_path is not None:
            for rel, _size, _sha in outputs:
                try:
                    info_hash, magnet = await self.swarm.seed(cwd / rel, self.tracker)
                except (OSError, ValueError) as exc:  # the HTTP server still has it
                    log.warning("%s/%s: cannot seed %s through the peer: %s", job, task, rel, exc)
                    continue
                pub.info_hashes.append(info_hash)
                magnets[str(rel)] = magnet
        await self._save()  # before the result with the secret is reported
        source: dict[str, Any] = {"url": self.url, "secret": pub.secret}
        if magnets:
            source["magnets"] = magnets
        return source

    def ended(self, jobs: list[int], now: float) -> None:
        for job in jobs:
            if job not in self.expiry and any(j == job for j, _t in self.published):
                self.expiry[job] = now + self.retention
                log.info("job %d ended: its outputs here go in %.0f s", job, self.retention)

    async def sweep(self, now: float) -> int:
        """Remove the outputs of jobs past their retention; returns how many jobs went."""
        gone = [job for job, at in self.expiry.items() if at <= now]
        for job in gone:
            del self.expiry[job]
            keys = [k for k in self.published if k[0] == job]
            for k in keys:
                pub = self.published.pop(k)
                for info_hash in pub.info_hashes:
                    with contextlib.suppress(OSError, ValueError):
                        await self.swarm.unseed(info_hash)
            await self._save()
            await trio.to_thread.run_sync(shutil.rmtree, self.work_dir / str(job), True)
            if self.metrics is not None:
                self.metrics.outputs_swept.inc()
        return len(gone)

    # -- serving -------------------------------------------------------------------

    async def handle(self, req: HttpRequest) -> HttpResponse:
        parts = urllib.parse.unquote(req.target.decode("latin-1").split("?", 1)[0]).lstrip("/").split("/", 2)
        if req.method != b"GET" or len(parts) != 3 or not parts[0].isdigit():
            self._count("bad_request")
            return HttpResponse(400, [(b"content-type", b"text/plain")], b"GET /<job>/<task>/<output>\n")
        job, task, rel = int(parts[0]), parts[1], parts[2]
        pub = self.published.get((job, task))
        auth = req.header(b"authorization", b"") or b""
        if pub is None or rel not in pub.outputs:
            self._count("not_found")
            return HttpResponse(404, [(b"content-type", b"text/plain")], b"no such published output\n")
        if not hmac.compare_digest(auth, b"Bearer " + pub.secret.encode()):
            self._count("forbidden")
            return HttpResponse(403, [(b"content-type", b"text/plain")], b"wrong or missing bearer token\n")
        size = pub.outputs[rel]
        start = 0
        rng = (req.header(b"range", b"") or b"").decode("latin-1")
        if rng.startswith("bytes=") and rng[6:].split("-", 1)[0].isdigit():
            start = int(rng[6:].split("-", 1)[0])
        if start > size:
            self._count("bad_range")
            return HttpResponse(416, [(b"content-range", f"bytes */{size}".encode())], b"")
        path = pub.directory / rel
        try:
            body = await trio.to_thread.run_sync(_read_at, path, start, min(CHUNK, size - start))
        except OSError:
            self._count("not_found")
            return HttpResponse(404, [(b"content-type", b"text/plain")], b"output file gone\n")
        if self.metrics is not None:
            self.metrics.output_bytes_served.inc(len(body))
        end = start + len(body) - 1
        return HttpResponse(206, [(b"content-type", b"application/octet-stream"),
                                  (b"content-range", f"bytes {start}-{max(end, start)}/{size}".encode())], body)


def _read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


# -- fetching (the consumer's side) ------------------------------------------------------


class FetchError(Exception):
    """A task input could not be fetched, or came out wrong (the task is not run)."""


async def fetch_task_input(src: FetchSource, job: str, work_dir: Path, dest: Path, limit: int, swarm: Any,
                           timeout: float) -> str:
    """Fetch one ``task:A/PATH`` input into ``dest``, verified; returns how (``local``, ``swarm``, ``http``)."""
    from shoal.core.dispatch.jobs import task_input

    producer, rel = task_input(src.input)
    if src.size > limit:
        raise FetchError(f"{src.input}: {src.size} bytes, above max_input_bytes ({limit})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    local = work_dir / job / producer / rel
    if not src.sha256:  # run earlier in this same unit: only here
        if not local.is_file():
            raise FetchError(f"{src.input}: {producer} left no {rel}")
        await trio.to_thread.run_sync(_link_or_copy, local, dest)
        return "local"
    if local.is_file() and await trio.to_thread.run_sync(_sha256, local) == src.sha256:
        await trio.to_thread.run_sync(_link_or_copy, local, dest)
        return "local"
    failures = []
    if src.magnet and swarm is not None and swarm.socket_path is not None:
        try:
            with trio.fail_after(timeout):
                got = await swarm.fetch_magnet(src.magnet, dest.parent / ".swarm", limit)
            if await trio.to_thread.run_sync(_sha256, got) == src.sha256:
                await trio.to_thread.run_sync(_link_or_copy, got, dest)
                return "swarm"
            failures.append("swarm: the file's SHA-256 differs from the recorded one")
        except trio.TooSlowError:
            failures.append("swarm: not fetched in time")
        except Exception as exc:  # noqa: BLE001 - InputError, RpcError, OSError: all mean "try HTTP"
            failures.append(f"swarm: {exc}")
    if not src.url:
        raise FetchError(f"{src.input}: not published by {producer}'s worker" +
                         (f" ({'; '.join(failures)})" if failures else ""))
    url = f"{src.url}/{job}/{urllib.parse.quote(producer)}/{urllib.parse.quote(rel)}"
    try:
        digest = await trio.to_thread.run_sync(_http_fetch, url, src.secret, src.size, dest)
    except OSError as exc:
        failures.append(f"http: {getattr(exc, 'reason', None) or exc}")
        raise FetchError(f"{src.input}: " + "; ".join(failures)) from None
    if digest != src.sha256:
        await trio.Path(dest).unlink(missing_ok=True)
        raise FetchError(f"{src.input}: SHA-256 {digest[:16]}... differs from the recorded {src.sha256[:16]}...")
    return "http"


def _http_fetch(url: str, secret: str, size: int, dest: Path) -> str:
    """GET the output range by range (each at most CHUNK bytes) into ``dest``; its SHA-256."""
    h = hashlib.sha256()
    got = 0
    with open(dest, "wb") as out:
        while got < size or got == 0:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {secret}",
                                                       "Range": f"bytes={got}-{got + CHUNK - 1}"})
            with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT) as resp:  # noqa: S310 - http(s) only
                chunk = resp.read(CHUNK + 1)
            if len(chunk) > CHUNK or got + len(chunk) > size:
                raise OSError(f"{url}: the server sent more than the recorded {size} bytes")
            out.write(chunk)
            h.update(chunk)
            got += len(chunk)
            if not chunk:
                break
    if got != size:
        raise OSError(f"{url}: {got} bytes, the producer recorded {size}")
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _link_or_copy(src: Path, dest: Path) -> None:
    """A copy: the task may change its input in place, and the original is still served."""
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    shutil.copyfile(src, dest)
