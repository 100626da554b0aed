"""`shoal dispatch simulate`: seed 004's experiments in the simulator.

Three sweeps, as in seed 004 section IV.C (Figures 3, 4 and 5): the number of
tasks, the task arrival density (tasks per second) and the number of servers.
For every point and every pairing of a dispatch policy with a queue policy
(:data:`~.sim.PAIRINGS`: the seed's NF, RS, LS, plus HEFT+EDF and the learned
DQN+EDF and DAMD = DQN + multi-agent scheduler) it runs ``--seeds`` random
workloads and reports the mean over seeds of the average response time and of
the deadline miss rate.

Learned policies are first trained on ``--train`` episodes of the base
configuration (workload seeds disjoint from the evaluation seeds); every
evaluation run then starts from a copy of the trained weights and keeps learning
online, as the live dispatcher does. Output: a table per sweep on stdout, a JSON
file (``--json``) and one SVG line chart per sweep and metric (``--plots``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from shoal.core.dispatch.policy import make_dispatch_policy, make_queue_policy
from shoal.core.dispatch.sim import PAIRINGS, generate_workload, learned, simulate

SWEEPS: dict[str, list[float]] = {
    "tasks": [200, 400, 600, 800, 1000],
    "density": [4, 6, 8, 10, 12],
    "servers": [6, 8, 10, 12, 14],
}
AXIS = {"tasks": "n_tasks", "density": "density", "servers": "n_servers"}
LABEL = {"tasks": "number of tasks", "density": "task arrival density (tasks/s)",
         "servers": "number of servers"}
# Train/evaluation workload seeds never overlap.
TRAIN_SEED_BASE = 10_000
# Upper bounds so a typo on the command line cannot run for hours.
MAX_TASKS = 100_000
MAX_SERVERS = 1_000
MAX_SEEDS = 100


def learner_options(time_scale: float) -> dict[str, Any]:
    return {"time_scale": time_scale, "eps_decay": 3000}


class Trained:
    """Holds the trained state of the learned policies and hands out fresh copies."""

    def __init__(self, time_scale: float, seed: int = 0) -> None:
        self.opts = learner_options(time_scale)
        self.seed = seed
        self.dqn = make_dispatch_policy("dqn", seed=seed, **self.opts)
        self.marl = make_queue_policy("marl", seed=seed, **self.opts)
        self.episodes = 0

    def train(self, episodes: int, base: dict[str, Any],
              log: Callable[[str], None] = lambda s: None) -> None:
        for ep in range(episodes):
            w = generate_workload(**{**base, "seed": TRAIN_SEED_BASE + self.episodes})
            # Each learner trains next to the strongest classic partner, then together.
            r1 = simulate(w, self.dqn, make_queue_policy("edf"))
            r2 = simulate(w, make_dispatch_policy("least-load"), self.marl)
            r3 = simulate(w, self.dqn, self.marl)
            self.episodes += 1
            log(f"train episode {ep + 1}/{episodes}: DQN+EDF {r1.mean_response:.2f}s, "
                f"LS+MARL {r2.mean_response:.2f}s, DAMD {r3.mean_response:.2f}s")

    def fresh(self, name: str, kind: str):  # noqa: ANN201 - a policy
        if kind == "dispatch":
            if name != "dqn":
                return make_dispatch_policy(name, seed=self.seed)
            p = make_dispatch_policy("dqn", seed=self.seed, **self.opts)
            p.load_state_dict(self.dqn.state_dict())
            return p
        if name != "marl":
            return make_queue_policy(name, seed=self.seed)
        q = make_queue_policy("marl", seed=self.seed, **self.opts)
        q.load_state_dict(self.marl.state_dict())
        return q


def run_point(params: dict[str, Any], pairings: Sequence[str], seeds: Sequence[int],
              trained: Trained) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in pairings:
        d, q = PAIRINGS[name]
        resp, miss, dec = [], [], []
        for s in seeds:
            w = generate_workload(**{**params, "seed": s})
            r = simulate(w, trained.fresh(d, "dispatch"), trained.fresh(q, "queue"))
            resp.append(r.mean_response)
            miss.append(r.miss_rate)
            dec.append(r.summary()["decision_us"])
        out[name] = {
            "mean_response_s": sum(resp) / len(resp),
            "miss_rate": sum(miss) / len(miss),
            "decision_us": sum(dec) / len(dec),
        }
    return out


def run_sweep(sweep: str, values: Sequence[float], base: dict[str, Any], pairings: Sequence[str],
              seeds: Sequence[int], trained: Trained) -> list[dict[str, Any]]:
    rows = []
    for v in values:
        params = dict(base)
        params[AXIS[sweep]] = int(v) if sweep != "density" else float(v)
        rows.append({"value": v, "results": run_point(params, pairings, seeds, trained)})
    return rows


def format_table(sweep: str, rows: list[dict[str, Any]], pairings: Sequence[str]) -> str:
    lines = [f"## {LABEL[sweep]}: average response time (s) / deadline miss rate"]
    head = f"{sweep:>8} " + " ".join(f"{p:>15}" for p in pairings)
    lines += [head, "-" * len(head)]
    for row in rows:
        cells = [f"{row['results'][p]['mean_response_s']:7.2f} / {row['results'][p]['miss_rate']:5.3f}"
                 for p in pairings]
        lines.append(f"{row['value']:>8g} " + " ".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def line_chart(title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]]):
    """A matplotlib figure: one line with markers per series (the "Agg" backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for name, pts in series.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_ylim(bottom=0.0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#ddd")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def _svg(fig) -> bytes:
    """The figure as an inline-able SVG: text kept as text, no date, no XML prolog."""
    import io

    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    data = buf.getvalue()
    return data[data.index(b"<svg"):]  # the page embeds it: no <?xml ...?> or DOCTYPE


def write_plots(directory: Path, sweep: str, rows: list[dict[str, Any]],
                pairings: Sequence[str]) -> list[Path]:
    """Each figure as PNG and SVG; returns the paths written."""
    import io

    from shoal.daemons.runtime.state import atomic_write

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, ylabel in (("mean_response_s", "average response time (s)"),
                           ("miss_rate", "deadline miss rate")):
        series = {p: [(float(r["value"]), r["results"][p][metric]) for r in rows] for p in pairings}
        fig = line_chart(f"{ylabel} vs {LABEL[sweep]}", LABEL[sweep], ylabel, series)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        for suffix, data in (("png", png.getvalue()), ("svg", _svg(fig))):
            path = directory / f"{sweep}_{metric}.{suffix}"
            atomic_write(path, data, mode=0o644)
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------- CLI


def _csv_numbers(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"need positive numbers: {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", choices=[*SWEEPS, "all", "none"], default="none",
                        help="vary the number of tasks, the arrival density or the number of "
                             "servers (seed 004 Fig. 3-5); 'none' runs the base point only")
    parser.add_argument("--values", type=_csv_numbers, default=None,
                        help="comma-separated values for the swept axis (default: built-in)")
    parser.add_argument("--tasks", type=int, default=600, help="tasks per run (default 600)")
    parser.add_argument("--density", type=float, default=8.0,
                        help="tasks arriving per second (default 8)")
    parser.add_argument("--servers", type=int, default=10, help="number of servers (default 10)")
    parser.add_argument("--seeds", type=int, default=3, help="workloads per point (default 3)")
    parser.add_argument("--train", type=int, default=6,
                        help="training episodes for the learned policies (default 6)")
    parser.add_argument("--time-scale", type=float, default=10.0,
                        help="seconds per unit of T in the reward e^(-T) (default 10)")
    parser.add_argument("--pairings", default=",".join(PAIRINGS),
                        help=f"comma-separated pairings among {','.join(PAIRINGS)}")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plots", type=Path, default=None, help="write SVG charts in this folder")


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    pairings = [p.strip() for p in args.pairings.split(",") if p.strip()]
    bad = [p for p in pairings if p not in PAIRINGS]
    problems = []
    if bad or not pairings:
        problems.append(f"unknown pairing(s) {bad or args.pairings!r}; known: {', '.join(PAIRINGS)}")
    if not 1 <= args.tasks <= MAX_TASKS:
        problems.append(f"--tasks must be in 1..{MAX_TASKS}")
    if not 1 <= args.servers <= MAX_SERVERS:
        problems.append(f"--servers must be in 1..{MAX_SERVERS}")
    if not 1 <= args.seeds <= MAX_SEEDS:
        problems.append(f"--seeds must be in 1..{MAX_SEEDS}")
    if not 0 <= args.train <= 1000:
        problems.append("--train must be in 0..1000")
    if not (args.density > 0 and args.time_scale > 0):
        problems.append("--density and --time-scale must be > 0")
    if args.values is not None and args.sweep in ("none", "all"):
        problems.append("--values needs --sweep tasks|density|servers")
    if args.values is not None and args.sweep == "servers" and max(args.values) > MAX_SERVERS:
        problems.append(f"server counts must be <= {MAX_SERVERS}")
    if args.values is not None and args.sweep == "tasks" and max(args.values) > MAX_TASKS:
        problems.append(f"task counts must be <= {MAX_TASKS}")
    if problems:
        print(f"shoal dispatch simulate: {problems[0]}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    base = {"n_tasks": args.tasks, "density": args.density, "n_servers": args.servers}
    seeds = list(range(1, args.seeds + 1))
    trained = Trained(args.time_scale)
    if any(learned(PAIRINGS[p]) for p in pairings) and args.train:
        trained.train(args.train, base, log=lambda s: print(s, file=out, flush=True))
    sweeps = list(SWEEPS) if args.sweep == "all" else [] if args.sweep == "none" else [args.sweep]
    result: dict[str, Any] = {"base": base, "seeds": seeds, "train_episodes": args.train,
                              "time_scale": args.time_scale, "pairings": {p: list(PAIRINGS[p]) for p in pairings}}
    point = run_point(base, pairings, seeds, trained)
    result["base_point"] = point
    print(f"## base point: {args.tasks} tasks, {args.density:g} tasks/s, {args.servers} servers, "
          f"{len(seeds)} seeds", file=out)
    print(f"{'pairing':>10} {'response s':>11} {'miss rate':>10} {'decision us':>12}", file=out)
    for p in pairings:
        r = point[p]
        print(f"{p:>10} {r['mean_response_s']:11.2f} {r['miss_rate']:10.3f} {r['decision_us']:12.1f}",
              file=out)
    result["sweeps"] = {}
    for sweep in sweeps:
        values = args.values if args.values is not None else SWEEPS[sweep]
        rows = run_sweep(sweep, values, base, pairings, seeds, trained)
        result["sweeps"][sweep] = rows
        print("", file=out)
        print(format_table(sweep, rows, pairings), file=out, flush=True)
        if args.plots is not None:
            for path in write_plots(args.plots, sweep, rows, pairings):
                print(f"wrote {path}", file=out)
    result["wall_seconds"] = time.perf_counter() - t0
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal dispatch simulate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
