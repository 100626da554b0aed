"""The dispatcher-worker contract: every message between them, written down once.

Theory of operation
-------------------
The dispatcher (``shoal.daemons.dispatcher``) and its workers
(``shoal.daemons.worker``) talk over the runtime's RPC. This module is the
only place that knows the shape of what travels: the parameters of each RPC
method (:class:`Submit`, :class:`Register`, :class:`Heartbeat`, :class:`Pull`,
:class:`Report`, ...), a unit's *lease* (:class:`Lease`, with its
:class:`TaskSpec`\\ s), a task's outcome (:class:`TaskResult`) and the unit
key ``"<job>/<unit>"`` (:class:`UnitKey`). Both daemons import it; neither
imports the other.

Decoding is :meth:`Contract.decode`: anything wrong raises :class:`BadParams`
(a :class:`RemoteProtocolError`) naming the field, which the RPC server
answers ``bad_params``.

Compact batches. A report may carry thousands of task results, and a pull
hundreds of leases, so two items travel as positional lists rather than maps:

* a task result is ``[task, exit_code, started, finished, error, stdout,
  stderr, outputs]`` (:meth:`TaskResult.to_row` / :func:`decode_results`);
* a lease's scheduling facts are ``info = [work, data_size, mem, cpus,
  deadline, submitted, depth]`` (:meth:`Lease.facts`).

Both are encoded and decoded here and nowhere else.

No I/O and no clock here, like the rest of ``shoal.protocol``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.protocol.contract import BadParams, Contract, bounded

__all__ = [
    "KILLED",
    "VERDICTS",
    "MAX_WORKER_ID",
    "MAX_WAIT",
    "UnitKey",
    "TaskSpec",
    "Lease",
    "LeaseFacts",
    "TaskResult",
    "FetchSource",
    "decode_results",
    "Submit",
    "JobsQuery",
    "JobQuery",
    "TASK_STATES",
    "JOB_STATES",
    "Register",
    "Heartbeat",
    "Pull",
    "PullReply",
    "HeartbeatReply",
    "Report",
    "ReportReply",
    "Cancel",
    "Exclude",
    "MAX_HELD",
]

#: the error of a task the worker killed because the dispatcher said its job had ended
#: (``cancel`` in a heartbeat or report reply); the dispatcher records it as cancelled
KILLED = "killed: the dispatcher ended its job"
#: a node's telemetry verdict, as workers report it
VERDICTS = ("normal", "anomalous", "unknown")
MAX_WORKER_ID = 128  # characters: a host name with room to spare
MAX_WAIT = 10.0  # longest long poll, well under the RPC request timeout
MAX_SPEC = 1 << 20  # a spec fits one RPC frame (1 MiB); the daemon's own limit is lower
MAX_KEY = 160  # "<job id>/<unit id>": 20 digits, "/", a 64-character name, and slack
MAX_NAME = 64  # a task or unit name (jobs.NAME_RE)
MAX_ARGV = 256  # arguments per command (jobs.MAX_ARGV)
MAX_ARG = 4096  # characters per argument (jobs.MAX_ARG_BYTES)
MAX_FILES = 64  # inputs, and outputs, per task (jobs.MAX_FILES)
MAX_PATH = 4096  # characters of one input path or URL, or an output path
MAX_TASKS_PER_UNIT = 100_000  # a fused chain is at most a whole job (max_tasks_per_job)
MAX_PULL = 4096  # units one pull may ask for (the daemon caps it lower, max_pull)
MAX_REPORT = 100_000  # unit outcomes in one report (a report must also fit one 1 MiB frame)
MAX_ERROR = 4096  # characters of a task's error line kept
MAX_LOG = 1 << 20  # bytes of stdout or stderr per task (max_log_bytes is at most this)
MAX_EXCLUDE = 100_000  # workers the anomaly hook may name at once
MAX_REWARDS = 4096  # team-reward rows in one reply (the dispatcher sends at most 512)
MAX_HELD = 4096  # unit keys a worker lists in one heartbeat or report (4096 keys of 160 chars: 640 KiB)
MAX_JOBS_PAGE = 1000  # jobs in one `jobs` reply
MAX_STATES = 8  # states named in one filter
INFO_FIELDS = 7


# -- the unit key ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnitKey:
    """``"<job>/<unit>"``: which unit of which job a lease or a result is about."""

    job: int
    unit: str

    def __post_init__(self) -> None:
        if self.job < 0 or not self.unit or len(self.unit) > MAX_KEY:
            raise BadParams(f"unit key: bad job {self.job} or unit {self.unit[:64]!r}")

    @classmethod
    def parse(cls, raw: Any) -> UnitKey:
        if not isinstance(raw, str) or len(raw) > MAX_KEY:
            raise BadParams(f"unit key: expected \"<job>/<unit>\" of at most {MAX_KEY} characters")
        job, sep, unit = raw.partition("/")
        if not sep or not job.isdigit() or not job.isascii() or not unit:
            raise BadParams(f"unit key {raw[:64]!r}: expected \"<job>/<unit>\"")
        return cls(int(job), unit)

    @classmethod
    def job_of(cls, raw: str) -> str:
        """The job part of a key, as text (for a task's directory and environment)."""
        return str(cls.parse(raw).job)

    def __str__(self) -> str:
        return f"{self.job}/{self.unit}"


# -- leases ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskSpec(Contract):
    """What a worker needs to run one task of a leased unit."""

    name: str = bounded(max_len=MAX_NAME)
    command: list[str] = bounded(max_len=MAX_ARGV)  # each argument: see TaskSpec.__post_init__
    builtin: str = bounded(max_len=MAX_ARG)  # "sleep N"
    timeout: float = bounded(min=0.0)
    inputs: list[str] = bounded(max_len=MAX_FILES)
    outputs: list[list[Any]] = bounded(max_len=MAX_FILES)  # [[path, max_bytes], ...]
    # where each ``task:NAME/PATH`` input is: [[input, size, sha256, url, secret, magnet], ...]
    # (see FetchSource); url "" = not published (the producer ran in this same unit)
    sources: list[list[Any]] | None = bounded(None, max_len=MAX_FILES)

    def __post_init__(self) -> None:
        if any(len(a) > MAX_ARG for a in self.command) or any(len(p) > MAX_PATH for p in self.inputs):
            raise BadParams(f"task {self.name!r}: an argument or input is too long")
        for src in self.sources or []:
            FetchSource.from_row(src)
        for o in self.outputs:
            if not (len(o) == 2 and isinstance(o[0], str) and len(o[0]) <= MAX_PATH
                    and isinstance(o[1], int) and not isinstance(o[1], bool)):
                raise BadParams(f"task {self.name!r}: outputs: expected [path, max_bytes] pairs")


@dataclass(frozen=True, slots=True)
class FetchSource:
    """Where a ``task:NAME/PATH`` input can be fetched: the producing worker's output server
    (``url``, with the per-task ``secret`` as a bearer token) and the swarm (``magnet``, ""
    when not seeded), checked against ``size`` and ``sha256`` as the producer recorded them."""

    input: str
    size: int
    sha256: str
    url: str = ""
    secret: str = ""
    magnet: str = ""

    @classmethod
    def from_row(cls, row: Any) -> FetchSource:
        ok = (isinstance(row, list) and len(row) == 6 and all(isinstance(v, str) for v in (row[0], *row[2:]))
              and isinstance(row[1], int) and not isinstance(row[1], bool) and row[1] >= 0
              and all(len(v) <= MAX_PATH for v in (row[0], *row[2:])))
        if not ok:
            raise BadParams("sources: expected [input, size, sha256, url, secret, magnet] rows")
        return cls(*row)

    def to_row(self) -> list[Any]:
        return [self.input, self.size, self.sha256, self.url, self.secret, self.magnet]


@dataclass(frozen=True, slots=True)
class LeaseFacts:
    """A leased unit's scheduling facts, for the worker's queue policy."""

    work: float
    data_size: float
    mem: float
    cpus: float
    deadline: float | None
    submitted: float
    depth: int


@dataclass(frozen=True, slots=True)
class Lease(Contract):
    """One unit handed to a worker by ``pull``."""

    key: str = bounded(max_len=MAX_KEY)
    attempt: int = bounded(min=1)
    timeout: float = bounded(min=0.0)
    tasks: list[TaskSpec] = bounded(max_len=MAX_TASKS_PER_UNIT)
    # [work, data_size, mem, cpus, deadline, submitted, depth]: compact, see the module docstring
    info: list[Any] = bounded(max_len=INFO_FIELDS)

    def __post_init__(self) -> None:
        UnitKey.parse(self.key)
        if len(self.info) != INFO_FIELDS:
            raise BadParams(f"{self.key}: info has {INFO_FIELDS} fields")
        *nums, deadline, submitted, depth = self.info
        if (not all(_number(v) for v in (*nums, submitted)) or not (deadline is None or _number(deadline))
                or not isinstance(depth, int) or isinstance(depth, bool)):
            raise BadParams(f"{self.key}: info has a field of the wrong type")

    @classmethod
    def make(cls, key: UnitKey, attempt: int, timeout: float, tasks: list[TaskSpec], facts: LeaseFacts) -> Lease:
        f = facts
        return cls(str(key), attempt, timeout, tasks,
                   [f.work, f.data_size, f.mem, f.cpus, f.deadline, f.submitted, f.depth])

    @property
    def unit_key(self) -> UnitKey:
        return UnitKey.parse(self.key)

    def facts(self) -> LeaseFacts:
        work, data, mem, cpus, deadline, submitted, depth = self.info
        return LeaseFacts(float(work), float(data), float(mem), float(cpus),
                          None if deadline is None else float(deadline), float(submitted), depth)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v


# -- results ---------------------------------------------------------------------------


@dataclass(slots=True)
class TaskResult(Contract):
    """One task's outcome, as a worker reports it.

    Not frozen: the worker trims a unit's logs in place before reporting
    (``daemons.worker.daemon._trim_logs``).
    """

    task: str = bounded(max_len=MAX_NAME)
    exit_code: int | None = None  # None: not run (timeout, input failure...)
    started: float = 0.0
    finished: float = 0.0
    error: str = bounded("", max_len=MAX_ERROR)
    stdout: bytes = bounded(b"", max_len=MAX_LOG)
    stderr: bytes = bounded(b"", max_len=MAX_LOG)
    outputs: list[list[Any]] | None = bounded(None, max_len=MAX_FILES)  # [[path, size, sha256hex], ...]
    # where the outputs are published: {"url": output server, "secret": bearer token,
    # "magnets": {path: magnet link}} (None: not published)
    source: dict[str, Any] | None = bounded(None, max_len=3)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.error

    def to_row(self) -> list[Any]:
        """The compact list form of a report (see the module docstring); a 9th field when published."""
        row = [self.task, self.exit_code, self.started, self.finished, self.error, self.stdout, self.stderr,
               self.outputs or []]
        return row if self.source is None else [*row, self.source]


def decode_results(raw: Any, max_log_bytes: int) -> list[tuple[UnitKey, list[TaskResult]]]:
    """A report's ``results``: ``[[unit key, [task result row, ...]], ...]``; logs cut to ``max_log_bytes``."""
    if not isinstance(raw, list):
        raise BadParams("results: expected a list")
    if len(raw) > MAX_REPORT:
        raise BadParams(f"results: at most {MAX_REPORT} units")
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)):
            raise BadParams("results: expected [unit key, [task results]] pairs")
        key_s, rows = item
        key = UnitKey.parse(key_s)
        if len(rows) > MAX_TASKS_PER_UNIT:
            raise BadParams(f"{key}: too many task results")
        results = []
        for row in rows:
            if not (isinstance(row, list) and len(row) in (8, 9)):
                raise BadParams(f"{key}: a task result has 8 fields (9 with where its outputs are published)")
            task, code, started, finished, error, stdout, stderr, outputs = row[:8]
            source = _source(row[8], key) if len(row) == 9 else None
            code_ok = code is None or (isinstance(code, int) and not isinstance(code, bool))
            if (not isinstance(task, str) or not code_ok
                    or not all(_number(t) for t in (started, finished))
                    or not isinstance(error, str) or not isinstance(stdout, bytes) or not isinstance(stderr, bytes)
                    or not isinstance(outputs, list)):
                raise BadParams(f"{key}: a task result has a field of the wrong type")
            results.append(TaskResult(task[:MAX_NAME], code, float(started), float(finished), error[:MAX_ERROR],
                                      stdout[:max_log_bytes], stderr[:max_log_bytes], outputs[:MAX_FILES], source))
        out.append((key, results))
    return out


def _source(raw: Any, key: UnitKey) -> dict[str, Any]:
    """A result's publication record: an http(s) URL, a secret, and magnet links by output path."""
    ok = (isinstance(raw, dict) and set(raw) <= {"url", "secret", "magnets"}
          and isinstance(raw.get("url", ""), str) and len(raw.get("url", "")) <= MAX_PATH
          and isinstance(raw.get("secret", ""), str) and len(raw.get("secret", "")) <= 128
          and isinstance(raw.get("magnets", {}), dict) and len(raw.get("magnets", {})) <= MAX_FILES
          and all(isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_PATH and len(v) <= MAX_PATH
                  for k, v in raw.get("magnets", {}).items()))
    if not ok or not (raw.get("url", "") == "" or raw["url"].startswith(("http://", "https://"))):
        raise BadParams(f"{key}: a result's source is {{url, secret, magnets}}")
    return raw


# -- RPC parameters ------------------------------------------------------------------------


def _check_worker(worker: str) -> None:
    if not worker or not worker.isprintable():
        raise BadParams(f"worker: expected 1 .. {MAX_WORKER_ID} printable characters")


def _check_keys(keys: list[str], what: str) -> None:
    for k in keys:
        try:
            UnitKey.parse(k)
        except BadParams as exc:
            raise BadParams(f"{what}: {exc}") from None


def _check_verdict(verdict: str | None) -> None:
    if verdict is not None and verdict not in VERDICTS:
        raise BadParams(f"verdict: expected one of {', '.join(VERDICTS)}")


@dataclass(frozen=True, slots=True)
class Submit(Contract):
    spec: bytes = bounded(max_len=MAX_SPEC)
    policy: str | None = bounded(None, max_len=MAX_NAME)


#: a task's recorded states (the store's), for `job` filters
TASK_STATES = ("pending", "done", "failed", "cancelled")
#: a job's states, for `jobs` filters
JOB_STATES = ("running", "done", "failed", "cancelled")


@dataclass(frozen=True, slots=True)
class JobsQuery(Contract):
    """One page of jobs, newest first: ``before`` (a job id) continues after the previous page."""

    limit: int = bounded(50, min=1, max=MAX_JOBS_PAGE)
    before: int | None = bounded(None, min=0)
    state: str | None = bounded(None, max_len=16)

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in JOB_STATES:
            raise BadParams(f"state: expected one of {', '.join(JOB_STATES)}")


@dataclass(frozen=True, slots=True)
class JobQuery(Contract):
    """One job, and a page of its tasks from ``offset`` (only those in ``states``, if given;
    none with ``summary``: counts by state and the first failures only)."""

    id: int = bounded(min=0)
    logs: bool = False
    offset: int = bounded(0, min=0)
    states: list[str] | None = bounded(None, max_len=MAX_STATES)
    summary: bool = False

    def __post_init__(self) -> None:
        if any(st not in TASK_STATES for st in self.states or []):
            raise BadParams(f"states: expected some of {', '.join(TASK_STATES)}")


@dataclass(frozen=True, slots=True)
class Register(Contract):
    """A worker's capacity."""

    worker: str = bounded(max_len=MAX_WORKER_ID)
    cpus: float = bounded(min=0.001, max=1e18)
    memory: float = bounded(min=0, max=1e18)
    cpu_speed: float = bounded(min=1e-9, max=1e18)
    bandwidth: float = bounded(min=1.0, max=1e18)
    rtt: float = bounded(min=0.0, max=1e18)
    verdict: str | None = bounded(None, max_len=16)

    def __post_init__(self) -> None:
        _check_worker(self.worker)
        _check_verdict(self.verdict)

    def capacity(self) -> dict[str, float]:
        return {"cpus": self.cpus, "memory": self.memory, "cpu_speed": self.cpu_speed,
                "bandwidth": self.bandwidth, "rtt": self.rtt}


@dataclass(frozen=True, slots=True)
class Heartbeat(Contract):
    worker: str = bounded(max_len=MAX_WORKER_ID)
    running: int = bounded(0, min=0)
    verdict: str | None = bounded(None, max_len=16)
    rewards: bool = False  # send the team reward (seed 004's shared reward) back
    # the units the worker holds (running first, then queued): the reply's ``cancel`` names
    # those whose job has ended, to kill or drop
    units: list[str] | None = bounded(None, max_len=MAX_HELD)
    # the jobs whose outputs the worker keeps (data between tasks): the reply's ``ended`` names
    # those that have ended, so their outputs go after the retention period
    jobs: list[int] | None = bounded(None, max_len=MAX_HELD)

    def __post_init__(self) -> None:
        _check_worker(self.worker)
        _check_verdict(self.verdict)
        _check_keys(self.units or [], "units")


@dataclass(frozen=True, slots=True)
class Pull(Contract):
    worker: str = bounded(max_len=MAX_WORKER_ID)
    max: int = bounded(min=-(1 << 62), max=1 << 62)  # the daemon clamps it to 1 .. max_pull
    wait: float = bounded(0.0, min=0.0, max=MAX_WAIT)
    rewards: bool = False

    def __post_init__(self) -> None:
        _check_worker(self.worker)


@dataclass(frozen=True, slots=True)
class HeartbeatReply(Contract):
    # [[unit key, worker, response time], ...]
    rewards: list[list[Any]] = bounded(max_len=MAX_REWARDS)
    # of the heartbeat's ``units``, those to kill (running) or drop (queued): their job ended
    cancel: list[str] | None = bounded(None, max_len=MAX_HELD)
    ended: list[int] | None = bounded(None, max_len=MAX_HELD)  # of the heartbeat's ``jobs``

    def __post_init__(self) -> None:
        _check_keys(self.cancel or [], "cancel")


@dataclass(frozen=True, slots=True)
class ReportReply(Contract):
    applied: int = bounded(0, min=0)
    duplicates: int = bounded(0, min=0)
    cancel: list[str] | None = bounded(None, max_len=MAX_HELD)  # as in HeartbeatReply

    def __post_init__(self) -> None:
        _check_keys(self.cancel or [], "cancel")


@dataclass(frozen=True, slots=True)
class PullReply(Contract):
    units: list[Lease] = bounded(max_len=MAX_PULL)
    rewards: list[list[Any]] = bounded(max_len=MAX_REWARDS)


@dataclass(frozen=True, slots=True)
class Report(Contract):
    worker: str = bounded(max_len=MAX_WORKER_ID)
    results: Any = None  # compact rows, decoded by decode_results (the daemon knows max_log_bytes)
    units: list[str] | None = bounded(None, max_len=MAX_HELD)  # as in Heartbeat: the reply says which to cancel

    def __post_init__(self) -> None:
        _check_worker(self.worker)
        _check_keys(self.units or [], "units")


@dataclass(frozen=True, slots=True)
class Cancel(Contract):
    """``shoal cancel JOB`` (an operator method, authenticated like ``submit``)."""

    id: int = bounded(min=0)


@dataclass(frozen=True, slots=True)
class Exclude(Contract):
    workers: list[str] = bounded(max_len=MAX_EXCLUDE)

    def __post_init__(self) -> None:
        if any(len(w) > MAX_WORKER_ID for w in self.workers):
            raise BadParams(f"workers: an id is longer than {MAX_WORKER_ID} characters")
