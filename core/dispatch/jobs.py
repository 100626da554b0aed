"""Job specs: TOML or JSON in, a validated DAG of tasks (and dispatch units) out.

Theory of operation
-------------------
A job is a DAG of tasks. :func:`parse_spec` takes the bytes a user submitted
(``shoal submit JOB``), decodes them as JSON (if they start with ``{``, or
``[`` and parse as JSON) or TOML, and builds a :class:`Job`. Everything is checked here, once, before the
dispatcher acknowledges anything: field types and bounds, task names, that
every dependency names a task of the job, and that the graph has no cycle.
Any problem raises one :class:`SpecError` whose ``reason`` is a fixed token
(for the ``shoal_dispatcher_specs_rejected_total{reason}`` metric) and whose
message is one line naming the task and field.

A task runs either an argv ``command`` (in its own process on a worker) or a
``builtin`` (``"sleep N"``, run inside the worker, for benchmarks). It has
resources (``cpus``, ``memory``), a ``work`` size in work units (what the
dispatch policies and seed 004's model call the task size) and a
``data_size`` in bytes, an optional ``deadline`` in seconds after the job's
submission, ``deps``, ``retries``, a ``timeout``, ``inputs`` (a local path,
an http(s) URL, ``swarm:FILE.torrent`` for the swarm peer, or
``task:NAME/OUTPUT``: a declared output of task NAME of the same job, which
makes NAME a dependency; the worker fetches it from NAME's worker) and
``outputs`` (files the task must leave, each with a size limit).
``replicas = N`` expands one entry into N tasks ``name.0 .. name.N-1``; a
dependency on a replicated name means all its replicas.

Workflow as the unit of work (seed 002). With ``bundle_chains = true`` every
maximal chain ``a -> b -> c`` in which each link is the only child of its
predecessor and the only parent of its successor is fused into one
:class:`Unit`, dispatched and leased as one invocation and run step by step on
one worker. Without it each task is a unit of its own. The dispatcher
schedules units; per-task results are still recorded.

Time is never read here: deadlines stay relative until the dispatcher adds
the submission time.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Job",
    "Limits",
    "Output",
    "SpecError",
    "Task",
    "Unit",
    "REASONS",
    "parse_memory",
    "parse_spec",
    "job_from_dict",
    "task_input",
    "TASK_INPUT",
]

#: ``reason`` tokens of SpecError (a fixed set: they label a metric).
REASONS = ("too_large", "syntax", "invalid", "cycle", "unknown_dep", "too_many_tasks")

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
MAX_ARGV = 256  # arguments per command
MAX_ARG_BYTES = 4096  # bytes per argument
MAX_FILES = 64  # inputs, and outputs, per task
MAX_DEPS = 1000  # direct dependencies per task
MAX_TIMEOUT = 7 * 86400.0
MAX_RETRIES = 100
MAX_OUTPUT_BYTES = 1 << 30  # per declared output file
MAX_SLEEP = 86400.0
TASK_INPUT = "task:"  # an input that is another task's declared output: task:NAME/PATH
JOB_KEYS = {"name", "policy", "bundle_chains", "tasks"}
TASK_KEYS = {
    "name", "command", "builtin", "cpus", "memory", "work", "data_size", "deadline", "deps",
    "retries", "timeout", "inputs", "outputs", "replicas",
}


class SpecError(ValueError):
    """A job spec was refused; ``str()`` is one line, ``reason`` a token from REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one spec (from the dispatcher's config)."""

    max_spec_bytes: int = 512 * 1024
    max_tasks: int = 10_000


@dataclass(frozen=True, slots=True)
class Output:
    path: str
    max_bytes: int


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    command: tuple[str, ...] = ()
    builtin: str = ""  # "sleep N"
    cpus: float = 1.0
    memory: int = 0  # bytes
    work: float = 1.0  # work units
    data_size: int = 0  # bytes
    deadline: float | None = None  # seconds after submission
    deps: tuple[str, ...] = ()
    retries: int = 0
    timeout: float = 3600.0
    inputs: tuple[str, ...] = ()
    outputs: tuple[Output, ...] = ()


@dataclass(frozen=True, slots=True)
class Unit:
    """What the dispatcher schedules: one task, or a fused chain run as one invocation."""

    id: str  # the first task's name
    tasks: tuple[str, ...]
    deps: tuple[str, ...]  # unit ids
    cpus: float
    memory: int
    work: float
    data_size: int
    deadline: float | None  # the earliest deadline of its tasks, relative
    retries: int
    timeout: float  # for the whole invocation: the sum of its tasks'


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    tasks: dict[str, Task]  # in topological order
    policy: str | None = None
    bundle_chains: bool = False
    units: dict[str, Unit] = field(default_factory=dict)  # in topological order
    depth: dict[str, int] = field(default_factory=dict)  # unit id -> longest path from a root
    # The validated document this job was read from, replicas unexpanded: what is stored,
    # so a 1,000,000-task job of one replicated entry stores one entry, not a million.
    spec: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A plain form (msgpack-able) that :func:`job_from_dict` reads back to an equal job."""
        return self.spec

    def edges(self) -> list[tuple[str, str]]:
        """(parent unit, child unit) pairs."""
        return [(d, u.id) for u in self.units.values() for d in u.deps]


# -- parsing ----------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_memory(value: Any, where: str) -> int:
    """Bytes from an integer or a string like ``"256MiB"`` / ``"2GB"``."""
    if isinstance(value, bool):
        raise SpecError("invalid", f"{where}: expected bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise SpecError("invalid", f"{where}: expected bytes like 512MiB, got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise SpecError("invalid", f"{where}: expected bytes, got {value!r}")
    if not 0 <= n <= 1 << 50:
        raise SpecError("invalid", f"{where}: out of range (0 .. 1 PiB)")
    return n


def parse_spec(data: bytes, limits: Limits = Limits()) -> Job:
    """Decode and validate a submitted spec; raise :class:`SpecError`."""
    if len(data) > limits.max_spec_bytes:
        raise SpecError("too_large", f"spec is {len(data)} bytes, the limit is {limits.max_spec_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError("syntax", f"spec is not UTF-8 (byte {exc.start})") from None
    head = text.lstrip()[:1]
    if head == "{":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError("syntax", f"invalid JSON: {exc}") from None
    elif head == "[":  # a JSON array, or TOML that opens with a table ([[tasks]])
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            try:
                doc = tomllib.loads(text)
            except tomllib.TOMLDecodeError as texc:
                raise SpecError("syntax", f"neither JSON ({exc}) nor TOML ({texc})") from None
    else:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError("syntax", f"invalid TOML: {exc}") from None
    return job_from_dict(doc, limits)


def job_from_dict(doc: Any, limits: Limits = Limits()) -> Job:
    if isinstance(doc, list):
        raise SpecError("invalid", "a job spec is a table (a JSON object) with name and tasks, not an array")
    if not isinstance(doc, dict):
        raise SpecError("invalid", "a job spec is a table with name and tasks")
    unknown = set(doc) - JOB_KEYS
    if unknown:
        raise SpecError("invalid", f"unknown key {sorted(unknown)[0]!r} (job keys: {', '.join(sorted(JOB_KEYS))})")
    name = doc.get("name", "job")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SpecError("invalid", f"name: expected 1-64 characters [A-Za-z0-9_.-], got {name!r}")
    policy = doc.get("policy")
    if policy is not None and (not isinstance(policy, str) or not policy):
        raise SpecError("invalid", f"policy: expected a policy name, got {policy!r}")
    bundle = doc.get("bundle_chains", False)
    if not isinstance(bundle, bool):
        raise SpecError("invalid", f"bundle_chains: expected true or false, got {bundle!r}")
    entries = doc.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise SpecError("invalid", "tasks: expected a non-empty array of tasks ([[tasks]] in TOML)")

    # Expand replicas first, so the task count limit sees the real count.
    replicas: dict[str, list[str]] = {}
    raw: list[tuple[list[str], dict]] = []
    total = 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SpecError("invalid", f"tasks[{i}]: expected a table")
        tname = entry.get("name")
        if not isinstance(tname, str) or not NAME_RE.fullmatch(tname):
            raise SpecError("invalid", f"tasks[{i}].name: expected 1-64 characters [A-Za-z0-9_.-], got {tname!r}")
        if tname in replicas:
            raise SpecError("invalid", f"task {tname!r}: the name is used twice")
        n = entry.get("replicas", 1)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SpecError("invalid", f"task {tname!r}: replicas: expected a positive integer, got {n!r}")
        total += n
        if total > limits.max_tasks:
            raise SpecError("too_many_tasks", f"the job has more than {limits.max_tasks} tasks")
        names = [tname] if n == 1 and "replicas" not in entry else [f"{tname}.{k}" for k in range(n)]
        replicas[tname] = names
        raw.append((names, entry))

    tasks: dict[str, Task] = {}
    for names, entry in raw:
        # The replicas of one entry differ only by name: validate the entry once (its
        # first replica's name in the messages) and copy it for the rest.
        first = _task(names[0], entry, replicas)
        for tname in names:
            if tname in tasks:
                raise SpecError("invalid", f"task {tname!r}: the name is used twice")
            tasks[tname] = first if tname == first.name else _renamed(first, tname)
    _check_task_inputs(tasks)
    order = _topological(tasks)
    tasks = {n: tasks[n] for n in order}
    units = _units(tasks, bundle)
    depth: dict[str, int] = {}
    for u in units.values():
        depth[u.id] = 1 + max((depth[d] for d in u.deps), default=-1)
    spec = {"name": name, "policy": policy, "bundle_chains": bundle, "tasks": [dict(e) for e in entries]}
    return Job(name=name, tasks=tasks, policy=policy, bundle_chains=bundle, units=units, depth=depth, spec=spec)


def _renamed(t: Task, name: str) -> Task:
    """``t`` under another name (dataclasses.replace, at a tenth of its cost per replica)."""
    return Task(name, t.command, t.builtin, t.cpus, t.memory, t.work, t.data_size, t.deadline, t.deps, t.retries,
                t.timeout, t.inputs, t.outputs)


def _number(entry: Mapping, key: str, default: float, lo: float, hi: float, where: str) -> float:
    v = entry.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise SpecError("invalid", f"{where}: {key}: expected a number in {lo:g} .. {hi:g}, got {v!r}")
    return float(v)


def _task(name: str, e: Mapping[str, Any], replicas: Mapping[str, list[str]]) -> Task:
    where = f"task {name!r}"
    unknown = set(e) - TASK_KEYS
    if unknown:
        raise SpecError("invalid", f"{where}: unknown key {sorted(unknown)[0]!r}")
    command = e.get("command", [])
    builtin = e.get("builtin", "")
    if isinstance(command, str):
        raise SpecError("invalid", f"{where}: command: expected an argv array like [\"prog\", \"arg\"], not a string")
    if (not isinstance(command, list) or len(command) > MAX_ARGV
            or not all(isinstance(a, str) and len(a.encode()) <= MAX_ARG_BYTES and "\0" not in a for a in command)):
        raise SpecError("invalid",
                        f"{where}: command: expected at most {MAX_ARGV} strings of at most {MAX_ARG_BYTES} bytes")
    if not isinstance(builtin, str):
        raise SpecError("invalid", f"{where}: builtin: expected a string like \"sleep 1\"")
    if bool(command) == bool(builtin):
        raise SpecError("invalid", f"{where}: give exactly one of command or builtin")
    if builtin:
        _check_builtin(builtin, where)
    deps: list[str] = []
    raw_deps = e.get("deps", [])
    if not isinstance(raw_deps, list) or not all(isinstance(d, str) for d in raw_deps):
        raise SpecError("invalid", f"{where}: deps: expected an array of task names")
    for d in raw_deps:
        if d not in replicas:
            raise SpecError("unknown_dep", f"{where}: depends on {d!r}, which is not a task of this job")
        deps.extend(replicas[d])
    deps.extend(_task_refs(e, name, replicas))  # a task's output as an input: it runs after that task
    if len(deps) > MAX_DEPS:
        raise SpecError("invalid", f"{where}: more than {MAX_DEPS} dependencies")
    if name in deps:
        raise SpecError("cycle", f"cycle: {name} -> {name}")
    deadline = e.get("deadline")
    if deadline is not None:
        deadline = _number(e, "deadline", 0, 0.0, MAX_TIMEOUT, where)
    retries = e.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise SpecError("invalid", f"{where}: retries: expected an integer in 0 .. {MAX_RETRIES}, got {retries!r}")
    return Task(
        name=name,
        command=tuple(command),
        builtin=builtin,
        cpus=_number(e, "cpus", 1.0, 0.0, 1024.0, where),
        memory=parse_memory(e.get("memory", 0), f"{where}: memory"),
        work=_number(e, "work", 1.0, 0.0, 1e12, where),
        data_size=parse_memory(e.get("data_size", 0), f"{where}: data_size"),
        deadline=deadline,
        deps=tuple(dict.fromkeys(deps)),
        retries=retries,
        timeout=_number(e, "timeout", 3600.0, 0.001, MAX_TIMEOUT, where),
        inputs=_inputs(e.get("inputs", []), where),
        outputs=_outputs(e.get("outputs", []), where),
    )


def _check_builtin(text: str, where: str) -> None:
    parts = text.split()
    if len(parts) == 2 and parts[0] == "sleep":
        try:
            secs = float(parts[1])
        except ValueError:
            secs = -1.0
        if 0 <= secs <= MAX_SLEEP:
            return
    raise SpecError("invalid", f"{where}: builtin: unknown builtin {text!r} (known: \"sleep SECONDS\")")


def _inputs(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_FILES or not all(isinstance(v, str) and v for v in value):
        raise SpecError("invalid", f"{where}: inputs: expected at most {MAX_FILES} paths or URLs")
    for v in value:
        if not (v.startswith(("/", "http://", "https://", "swarm:", TASK_INPUT))):
            raise SpecError("invalid", f"{where}: inputs: {v!r} is not an absolute path, http(s) URL, swarm:FILE "
                                       "or task:NAME/OUTPUT")
    return tuple(value)


def task_input(ref: str) -> tuple[str, str]:
    """``task:NAME/PATH`` -> (NAME, PATH): another task's declared output."""
    name, sep, path = ref[len(TASK_INPUT):].partition("/")
    return name, path if sep else ""


def _task_refs(entry: Mapping[str, Any], name: str, replicas: Mapping[str, list[str]]) -> list[str]:
    """The producers named by ``task:`` inputs: each is an implicit dependency."""
    out = []
    for ref in entry.get("inputs", []) if isinstance(entry.get("inputs", []), list) else []:
        if not isinstance(ref, str) or not ref.startswith(TASK_INPUT):
            continue
        prod, path = task_input(ref)
        names = replicas.get(prod)
        if names is None and prod.rsplit(".", 1)[0] in replicas and prod in replicas[prod.rsplit(".", 1)[0]]:
            names = [prod]  # one replica by its own name
        if names is None:
            raise SpecError("unknown_dep", f"task {name!r}: input {ref!r}: {prod!r} is not a task of this job")
        if len(names) != 1:
            raise SpecError("invalid", f"task {name!r}: input {ref!r}: name one replica ({names[0]}, ...)")
        if not path:
            raise SpecError("invalid", f"task {name!r}: input {ref!r}: expected task:NAME/OUTPUT")
        out.append(names[0])
    return out


def _check_task_inputs(tasks: Mapping[str, Task]) -> None:
    for t in tasks.values():
        for ref in t.inputs:
            if ref.startswith(TASK_INPUT):
                prod, path = task_input(ref)  # _task_refs made sure prod is one task of the job
                if path not in {o.path for o in tasks[prod].outputs}:
                    raise SpecError("invalid", f"task {t.name!r}: input {ref!r}: {prod!r} declares no output {path!r}")


def _outputs(value: Any, where: str) -> tuple[Output, ...]:
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise SpecError("invalid", f"{where}: outputs: expected at most {MAX_FILES} entries")
    out = []
    for v in value:
        if isinstance(v, str):
            v = {"path": v}
        if not isinstance(v, dict) or set(v) - {"path", "max_bytes"} or not isinstance(v.get("path"), str):
            raise SpecError("invalid", f"{where}: outputs: expected {{path = \"...\", max_bytes = N}} entries")
        path = v["path"]
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise SpecError("invalid", f"{where}: outputs: {path!r} must be relative to the task's directory")
        limit = parse_memory(v.get("max_bytes", 64 << 20), f"{where}: outputs: max_bytes")
        if limit > MAX_OUTPUT_BYTES:
            raise SpecError("too_large", f"{where}: outputs: max_bytes above the {MAX_OUTPUT_BYTES} byte limit")
        out.append(Output(path, limit))
    return tuple(out)


def _topological(tasks: Mapping[str, Task]) -> list[str]:
    """Kahn's algorithm in submission order; a cycle is reported as a path."""
    indegree = {n: len(t.deps) for n, t in tasks.items()}
    children: dict[str, list[str]] = {n: [] for n in tasks}
    for n, t in tasks.items():
        for d in t.deps:
            children[d].append(n)
    ready = deque(n for n, k in indegree.items() if k == 0)  # first in, first out: the spec's order
    order: list[str] = []
    while ready:
        n = ready.popleft()
        order.append(n)
        for c in children[n]:
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    if len(order) < len(tasks):
        raise SpecError("cycle", "cycle: " + " -> ".join(_find_cycle(tasks, {n for n, k in indegree.items() if k})))
    return order


def _find_cycle(tasks: Mapping[str, Task], left: set[str]) -> list[str]:
    # Every task left has a dependency that is also left: walk deps until a repeat.
    n = min(left)
    seen: dict[str, int] = {}
    path: list[str] = []
    while n not in seen:
        seen[n] = len(path)
        path.append(n)
        n = next(d for d in tasks[n].deps if d in left)
    cycle = path[seen[n]:] + [n]
    return list(reversed(cycle))  # as "a -> b" meaning b depends on a


def _units(tasks: Mapping[str, Task], bundle: bool) -> dict[str, Unit]:
    children: dict[str, list[str]] = {n: [] for n in tasks}
    for n, t in tasks.items():
        for d in t.deps:
            children[d].append(n)
    head_of: dict[str, str] = {}
    chains: dict[str, list[str]] = {}
    for n, t in tasks.items():  # topological order: a parent's head is known
        if bundle and len(t.deps) == 1 and len(children[t.deps[0]]) == 1:
            head = head_of[t.deps[0]]
            chains[head].append(n)
        else:
            head = n
            chains[head] = [n]
        head_of[n] = head
    units: dict[str, Unit] = {}
    for head, names in chains.items():
        if len(names) == 1:  # the common case, a unit of one task: no aggregates to take
            t = tasks[head]
            units[head] = Unit(head, (head,), tuple(dict.fromkeys(head_of[d] for d in t.deps)), t.cpus, t.memory,
                               t.work, t.data_size, t.deadline, t.retries, min(MAX_TIMEOUT, t.timeout))
            continue
        ts = [tasks[n] for n in names]
        deadlines = [t.deadline for t in ts if t.deadline is not None]
        units[head] = Unit(
            id=head,
            tasks=tuple(names),
            deps=tuple(dict.fromkeys(head_of[d] for d in tasks[head].deps)),
            cpus=max(t.cpus for t in ts),
            memory=max(t.memory for t in ts),
            work=sum(t.work for t in ts),
            data_size=sum(t.data_size for t in ts),
            deadline=min(deadlines) if deadlines else None,
            retries=max(t.retries for t in ts),
            timeout=min(MAX_TIMEOUT, sum(t.timeout for t in ts)),
        )
    return units


def task_payload(task: Task) -> dict[str, Any]:
    """What a worker needs to run one task (sent with the unit's lease)."""
    return {
        "name": task.name,
        "command": list(task.command),
        "builtin": task.builtin,
        "timeout": task.timeout,
        "inputs": list(task.inputs),
        "outputs": [[o.path, o.max_bytes] for o in task.outputs],
    }

