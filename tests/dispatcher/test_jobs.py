"""Job specs: parsing, validation with one clear message, DAG order, chain fusion."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.dispatch.jobs import Limits, SpecError, job_from_dict, parse_memory, parse_spec

TOML = b"""
name = "demo"
policy = "heft"

[[tasks]]
name = "prep"
command = ["python3", "-c", "print(1)"]
cpus = 2
memory = "256MiB"
work = 3.5
data_size = "1MB"
deadline = 30
retries = 2
timeout = 60
inputs = ["/etc/hostname", "https://example.invalid/x", "swarm:/srv/data.torrent"]
outputs = [{path = "out/result.txt", max_bytes = 1024}, "log.txt"]

[[tasks]]
name = "fan"
builtin = "sleep 0.1"
replicas = 3
deps = ["prep"]

[[tasks]]
name = "join"
builtin = "sleep 0"
deps = ["fan"]
"""


def test_toml_spec_round_trip():
    job = parse_spec(TOML)
    assert job.name == "demo" and job.policy == "heft"
    names = list(job.tasks)
    assert sorted(names) == ["fan.0", "fan.1", "fan.2", "join", "prep"]
    assert names[0] == "prep" and names[-1] == "join"  # topological order
    prep = job.tasks["prep"]
    assert prep.command == ("python3", "-c", "print(1)")
    assert prep.cpus == 2.0 and prep.memory == 256 * 1024 * 1024 and prep.data_size == 10**6
    assert prep.deadline == 30.0 and prep.retries == 2 and prep.timeout == 60.0
    assert prep.outputs[0].path == "out/result.txt" and prep.outputs[0].max_bytes == 1024
    assert prep.outputs[1].max_bytes == 64 << 20
    assert set(job.tasks["join"].deps) == {"fan.0", "fan.1", "fan.2"}
    # the plain form reads back to the same job
    again = job_from_dict(json.loads(json.dumps(job.to_dict())))
    assert again.tasks == job.tasks and again.units == job.units


def test_json_spec_is_accepted():
    doc = {"name": "j", "tasks": [{"name": "a", "builtin": "sleep 0"},
                                  {"name": "b", "command": ["true"], "deps": ["a"]}]}
    job = parse_spec(json.dumps(doc).encode())
    assert list(job.tasks) == ["a", "b"] and job.depth == {"a": 0, "b": 1}


@pytest.mark.parametrize(
    "doc, reason, words",
    [
        ({"tasks": [{"name": "a", "builtin": "sleep 0", "deps": ["b"]},
                    {"name": "b", "builtin": "sleep 0", "deps": ["a"]}]},
         "cycle", "cycle: "),
        ({"tasks": [{"name": "a", "builtin": "sleep 0", "deps": ["a"]}]}, "cycle", "a -> a"),
        ({"tasks": [{"name": "a", "builtin": "sleep 0", "deps": ["ghost"]}]}, "unknown_dep", "'ghost'"),
        ({"tasks": [{"name": "a", "builtin": "sleep 0", "replicas": 11}]}, "too_many_tasks", "more than 10"),
        ({"tasks": [{"name": "a", "command": "ls -l"}]}, "invalid", "argv array"),
        ({"tasks": [{"name": "a"}]}, "invalid", "exactly one of command or builtin"),
        ({"tasks": [{"name": "a", "builtin": "rm -rf /"}]}, "invalid", "unknown builtin"),
        ({"tasks": [{"name": "a", "builtin": "sleep 0", "cpus": -1}]}, "invalid", "cpus"),
        ({"tasks": [{"name": "a", "builtin": "sleep 0", "outputs": ["../etc/passwd"]}]}, "invalid", "relative"),
        ({"tasks": [{"name": "a", "builtin": "sleep 0", "outputs": [{"path": "x", "max_bytes": "2GiB"}]}]},
         "too_large", "max_bytes"),
        ({"tasks": [{"name": "a", "builtin": "sleep 0", "inputs": ["relative/path"]}]}, "invalid", "inputs"),
        ({"tasks": [{"name": "a", "builtin": "sleep 0", "colour": "red"}]}, "invalid", "unknown key 'colour'"),
        ({"tasks": [{"name": "a b", "builtin": "sleep 0"}]}, "invalid", "name"),
        ({"tasks": [{"name": "a", "builtin": "sleep 0"}, {"name": "a", "builtin": "sleep 0"}]}, "invalid", "twice"),
        ({"tasks": []}, "invalid", "non-empty"),
        ({"name": "x"}, "invalid", "tasks"),
    ],
)
def test_bad_specs_are_refused_with_one_line(doc, reason, words):
    with pytest.raises(SpecError) as info:
        job_from_dict(doc, Limits(max_tasks=10))
    assert info.value.reason == reason
    assert words in str(info.value) and "\n" not in str(info.value)


def test_three_cycle_is_named():
    doc = {"tasks": [{"name": n, "builtin": "sleep 0", "deps": [d]} for n, d in (("a", "c"), ("b", "a"), ("c", "b"))]}
    with pytest.raises(SpecError, match=r"cycle: (\w) -> (\w) -> (\w) -> \1"):
        job_from_dict(doc)


def test_syntax_and_size_errors():
    with pytest.raises(SpecError) as info:
        parse_spec(b"name = ", Limits())
    assert info.value.reason == "syntax"
    with pytest.raises(SpecError) as info:
        parse_spec(b"{not json", Limits())
    assert info.value.reason == "syntax"
    with pytest.raises(SpecError) as info:
        parse_spec(b"x" * 2000, Limits(max_spec_bytes=1000))
    assert info.value.reason == "too_large"
    with pytest.raises(SpecError):
        parse_memory("12 parsecs", "m")


def test_chains_fuse_into_units_only_when_asked():
    doc = {"bundle_chains": True, "tasks": [
        {"name": "a", "builtin": "sleep 0", "work": 1, "deadline": 9},
        {"name": "b", "builtin": "sleep 0", "deps": ["a"], "work": 2, "deadline": 5},
        {"name": "c", "builtin": "sleep 0", "deps": ["b"], "work": 3},
        {"name": "d", "builtin": "sleep 0", "deps": ["c"]},
        {"name": "e", "builtin": "sleep 0", "deps": ["c"]},   # c has two children: the chain ends at c
        {"name": "f", "builtin": "sleep 0", "deps": ["d", "e"]},
    ]}
    job = job_from_dict(doc)
    assert {u.id: u.tasks for u in job.units.values()} == {
        "a": ("a", "b", "c"), "d": ("d",), "e": ("e",), "f": ("f",)}
    a = job.units["a"]
    assert a.work == 6 and a.deadline == 5 and job.units["f"].deps == ("d", "e")
    doc["bundle_chains"] = False
    assert len(job_from_dict(doc).units) == 6


@st.composite
def dags(draw):
    n = draw(st.integers(1, 25))
    tasks = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=4)) if i else []
        tasks.append({"name": f"t{i}", "builtin": "sleep 0", "deps": [f"t{d}" for d in deps]})
    order = draw(st.permutations(range(n)))
    return {"bundle_chains": draw(st.booleans()), "tasks": [tasks[i] for i in order]}


@settings(max_examples=150, deadline=None)
@given(dags())
def test_topological_order_and_units_cover_every_task_once(doc):
    job = job_from_dict(doc)
    pos = {n: i for i, n in enumerate(job.tasks)}
    for t in job.tasks.values():
        assert all(pos[d] < pos[t.name] for d in t.deps)
    covered = [t for u in job.units.values() for t in u.tasks]
    assert sorted(covered) == sorted(job.tasks)
    upos = {u: i for i, u in enumerate(job.units)}
    head = {t: u.id for u in job.units.values() for t in u.tasks}
    for u in job.units.values():
        assert all(upos[d] < upos[u.id] for d in u.deps)
        # every task dependency outside the unit is a unit dependency
        for t in u.tasks:
            for d in job.tasks[t].deps:
                assert head[d] == u.id or head[d] in u.deps


def test_a_json_spec_starting_with_a_bracket_is_read_as_json():
    """A JSON array (a list of tasks, say) is a JSON mistake, not "invalid TOML"; TOML that opens with
    [[tasks]] still parses as TOML."""
    tasks = [{"name": "a", "builtin": "sleep 0"}]
    with pytest.raises(SpecError) as info:
        parse_spec(json.dumps(tasks).encode())
    assert info.value.reason == "invalid" and "not an array" in str(info.value) and "TOML" not in str(info.value)
    with pytest.raises(SpecError) as info:
        parse_spec(b'  [{"name": "a", ')
    assert info.value.reason == "syntax" and "JSON" in str(info.value)
    job = parse_spec(b'[[tasks]]\nname = "a"\nbuiltin = "sleep 0"\n')
    assert list(job.tasks) == ["a"]


def test_independent_tasks_keep_the_spec_order():
    names = ["zeta", "alpha", "mid", "beta", "omega"]
    job = job_from_dict({"tasks": [{"name": n, "builtin": "sleep 0"} for n in names]
                         + [{"name": "last", "builtin": "sleep 0", "deps": ["zeta"]}]})
    assert list(job.tasks) == [*names, "last"] and list(job.units) == [*names, "last"]


def test_a_replicated_entry_is_stored_as_one_entry_and_reads_back_whole():
    """A million-task job of one replicated entry stored every replica (asdict of each: most
    of a 100k submit's time); its plain form is now the entry, and reads back to equal tasks."""
    doc = {"name": "big", "tasks": [{"name": "t", "builtin": "sleep 0", "replicas": 50_000, "outputs": ["o"]},
                                    {"name": "j", "builtin": "sleep 0", "inputs": ["task:t.7/o"]}]}
    job = job_from_dict(doc, Limits(max_tasks=100_000))
    assert len(job.tasks) == 50_001 and job.tasks["t.49999"].builtin == "sleep 0"
    assert job.tasks["j"].deps == ("t.7",)
    assert len(json.dumps(job.to_dict())) < 300
    again = job_from_dict(json.loads(json.dumps(job.to_dict())), Limits(max_tasks=100_000))
    assert again.tasks == job.tasks and again.units == job.units
