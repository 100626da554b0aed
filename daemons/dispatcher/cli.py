"""``shoal submit JOB``, ``shoal cancel JOB``, ``shoal jobs``, ``shoal job ID [--logs]``, ``shoal dispatch simulate``,
and ``shoal dispatcher workers|exclude``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from shoal.daemons.runtime import cli
from shoal.protocol.dispatch import (
    JOB_STATES,
    MAX_JOBS_PAGE,
    TASK_STATES,
    Cancel,
    Exclude,
    JobQuery,
    JobsQuery,
    Submit,
)

DEFAULT_SOCKET = "/run/shoal-dispatcher/submit.sock"  # the unit's RuntimeDirectory= and submit.sock
MAX_SPEC_BYTES = 900 * 1024  # the largest max_spec_bytes a dispatcher may have: above it, ask for its own
SPEC_HINT = "use replicas = N for many alike tasks"


def add_commands(dispatcher: argparse._SubParsersAction, top: argparse._SubParsersAction) -> None:
    def conn(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", default=os.environ.get("SHOAL_SUBMIT_SOCKET", DEFAULT_SOCKET),
                       help="the dispatcher's submit socket, where your user is your credential "
                            f"(default $SHOAL_SUBMIT_SOCKET or {DEFAULT_SOCKET})")
        p.add_argument("--dispatcher", default=os.environ.get("SHOAL_DISPATCHER"),
                       help="host:port of the dispatcher's RPC instead of the socket (default $SHOAL_DISPATCHER); "
                            "submitting there needs --token-file")
        p.add_argument("--token-file", default=os.environ.get("SHOAL_TOKEN_FILE"),
                       help="file with the dispatcher's RPC token, with --dispatcher (default $SHOAL_TOKEN_FILE)")
        return p

    s = conn(top.add_parser("submit", help="submit a job (a DAG of tasks, TOML or JSON)"))
    s.add_argument("job", help="the job spec file ('-' reads stdin)")
    s.add_argument("--policy", help="dispatch policy for this job (default: the spec's, else the dispatcher's)")
    s.add_argument("--wait", action="store_true", help="show progress until the job finishes; exit 1 if it fails")
    s.set_defaults(func=cmd_submit)

    k = conn(top.add_parser("cancel", help="cancel a running job: its running tasks are killed, no new ones start"))
    k.add_argument("id", type=int, help="the job id")
    k.set_defaults(func=cmd_cancel)

    j = conn(top.add_parser("jobs", help="list recent jobs, newest first"))
    j.add_argument("--limit", type=_positive, default=20, help="how many (any number: fetched in pages)")
    j.add_argument("--before", type=_positive, help="only jobs with ids below this one (the next page)")
    j.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    j.set_defaults(func=cmd_jobs)

    one = conn(top.add_parser("job", help="one job's tasks, states and outputs"))
    one.add_argument("id", type=int)
    one.add_argument("--logs", action="store_true", help="also print each task's captured stdout and stderr")
    one.add_argument("--summary", action="store_true",
                     help="counts by state and the first failed tasks, not every task (for big jobs)")
    one.add_argument("--state", action="append", choices=TASK_STATES, dest="states",
                     help="only tasks in this state (repeat for several)")
    one.set_defaults(func=cmd_job)

    w = conn(dispatcher.add_parser("workers", help="the live workers and their queues"))
    w.set_defaults(func=cmd_workers)
    x = conn(dispatcher.add_parser("exclude", help="exclude workers from dispatch (the anomaly hook); none clears"))
    x.add_argument("workers", nargs="*")
    x.set_defaults(func=cmd_exclude)



def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return n


# A job is read, planned and stored before the dispatcher answers: seconds for
# a million tasks on a busy node, so the answer may take longer than other calls'.
SUBMIT_TIMEOUT = 600.0


def target(args) -> str:
    """The RPC address when given, else the submit socket (a path: cli.call speaks unix)."""
    return args.dispatcher or str(Path(args.socket).absolute())


def rpc(args, method: str, params=None):
    """One call to the dispatcher; any failure is one line on stderr and exit 2."""
    return cli.call(target(args), method, params, what="the dispatcher",
                    token_file=args.token_file if args.dispatcher else None)


def cmd_submit(args) -> int:
    try:
        spec = sys.stdin.buffer.read() if args.job == "-" else Path(args.job).read_bytes()
    except OSError as exc:
        return cli.fail(f"{args.job}: {exc.strerror}")
    if len(spec) > MAX_SPEC_BYTES:  # too big to send: say the dispatcher's own limit, as it would
        limit = rpc(args, "limits")["max_spec_bytes"]
        return cli.fail(f"spec is {len(spec)} bytes, the limit is {limit}: {SPEC_HINT}")
    # A refused spec reads best as its reason alone: "shoal: cycle: a -> a".
    reply = cli.call(target(args), "submit", Submit(spec=spec, policy=args.policy or None), what="the dispatcher",
                     token_file=args.token_file if args.dispatcher else None,
                     message_only=("bad_spec",), timeout=SUBMIT_TIMEOUT)
    print(f"job {reply['job']} accepted: {reply['tasks']} tasks in {reply['units']} units")
    if not args.wait:
        return 0
    while True:
        view = rpc(args, "job", JobQuery(id=reply["job"]))
        print("\r" + progress_line(view), end="", flush=True)
        if view["state"] != "running":
            print()
            return 0 if view["state"] == "done" else 1
        time.sleep(0.5)  # a display refresh


def cmd_cancel(args) -> int:
    reply = cli.call(target(args), "cancel", Cancel(id=args.id), what="the dispatcher",
                     token_file=args.token_file if args.dispatcher else None, message_only=("not_running",))
    print(f"job {args.id} cancelled: {reply['cancelled']} units cancelled, {reply['killing']} of them leased "
          "to workers, which kill those running (`shoal job` shows what each unit did)")
    return 0


def progress_line(view: dict) -> str:
    counts = view["counts"]
    done, total = counts.get("done", 0), view["total"]
    bar = "#" * int(24 * done / total) if total else ""
    rest = " ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "done")
    return f"job {view['id']} {view['name']:<16} [{bar:<24}] {done}/{total} {view['state']}  {rest}"


def _when(t) -> str:
    return "-" if t is None else time.strftime("%H:%M:%S", time.localtime(t))


def job_pages(args):
    """Up to ``args.limit`` jobs, newest first, one RPC page (at most MAX_JOBS_PAGE) at a time."""
    left, before = args.limit, args.before
    while left > 0:
        page = rpc(args, "jobs", JobsQuery(limit=min(left, MAX_JOBS_PAGE), before=before, state=args.state))
        yield from page
        if len(page) < min(left, MAX_JOBS_PAGE):
            return
        left -= len(page)
        before = page[-1]["id"]


def cmd_jobs(args) -> int:
    rows = list(job_pages(args))
    if not rows:
        print("no jobs")
        return 0
    print(f"{'ID':>6} {'NAME':<20} {'STATE':<9} {'DONE':>11} {'FAILED':>6} {'POLICY':<10} {'SUBMITTED':<9} BY")
    for r in rows:
        print(f"{r['id']:>6} {r['name'][:20]:<20} {r['state']:<9} {r['done']:>5}/{r['tasks']:<5} {r['failed']:>6} "
              f"{r['policy']:<10} {_when(r['submitted']):<9} {r.get('submitted_by') or '-'}")
    return 0


def _all_tasks(args, view: dict):
    """The tasks of every page of the job (a page is what fits one RPC frame)."""
    while True:
        yield from view["tasks"]
        offset = view["offset"] + len(view["tasks"])
        if not view["tasks"] or offset >= view["matching"]:
            return
        view = rpc(args, "job", JobQuery(id=args.id, logs=args.logs, offset=offset, states=args.states))


def cmd_job(args) -> int:
    if args.summary:
        view = rpc(args, "job", JobQuery(id=args.id, summary=True))
    else:
        view = rpc(args, "job", JobQuery(id=args.id, logs=args.logs, states=args.states))
    print(progress_line(view) + f"  submitted by {view.get('submitted_by') or '-'}")
    if view.get("reason"):
        print(f"  {view['reason']}")
    if args.summary:
        print("  " + ", ".join(f"{st} {view['counts'].get(st, 0)}" for st in TASK_STATES)
              + f"  (total {view['total']})")
        if view["tasks"]:
            print(f"  first failed tasks ({len(view['tasks'])} of {view['counts'].get('failed', 0)}):")
    for t in _all_tasks(args, view) if not args.summary else view["tasks"]:
        took = f"{t['finished'] - t['started']:.3f}s" if t["finished"] is not None else "-"
        line = (f"  {t['task']:<24} {t['state']:<9} exit {t['exit_code'] if t['exit_code'] is not None else '-':<4} "
                f"{took:>9} attempts {t['attempts']} {t['worker'] or ''}")
        if t["error"]:
            line += f"  ({t['error']})"
        print(line)
        for path, size, digest in t["outputs"]:
            print(f"      output {path} {size} bytes sha256 {digest[:16]}")
        if args.logs:
            for stream in ("stdout", "stderr"):
                if t.get(stream):
                    text = t[stream].decode("utf-8", "replace").rstrip("\n")
                    print(f"    --- {stream}\n" + "\n".join("    " + ln for ln in text.splitlines()))
    return 0


def cmd_workers(args) -> int:
    rows = rpc(args, "workers")
    for w in rows:
        print(f"{w['id']:<24} cpus {w['cpus']:g} mem {w['memory'] / 2**30:.1f} GiB rtt {w['rtt'] * 1000:.2f} ms "
              f"queued {w['queued']} leased {w['leased']} running {w['running']}"
              f"{'' if w.get('verdict') is None else ' node ' + w['verdict']}"
              f"{' EXCLUDED' if w['excluded'] else ''}")
    return 0 if rows else 1


def cmd_exclude(args) -> int:
    reply = rpc(args, "exclude", Exclude(workers=args.workers))
    print(f"excluding {reply['excluded']} workers")
    return 0
