"""The ``shoal`` command.

Subcommands import their daemon lazily, so ``shoal --version`` or a config
check does not pay for onnxruntime or Flower.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from shoal.daemons.runtime.registry import DAEMONS


def _version() -> str:
    try:
        return version("shoal")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def _shoal_exe() -> str:
    """The absolute path of this ``shoal`` script, for units that run it."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "shoal" and argv0.exists():
        return str(argv0.resolve())
    found = shutil.which("shoal")
    if found:
        return str(Path(found).resolve())
    raise SystemExit("shoal: cannot find the installed `shoal` script; pass --shoal-exe")


def cmd_run(args: argparse.Namespace) -> int:
    from shoal.daemons.runtime.daemon import run_daemon

    spec = DAEMONS[args.daemon]
    return run_daemon(args.daemon, Path(args.config), spec.load_schema(), spec.load_factory())


def _daemon_of(file: str) -> str | None:
    """The one daemon whose config has every table of ``file`` (besides [daemon]), if just one does."""
    import dataclasses
    import tomllib

    from shoal.daemons.runtime.config import ConfigError, read_config_text

    try:
        tables = set(tomllib.loads(read_config_text(file))) - {"daemon"}
    except (ConfigError, tomllib.TOMLDecodeError):
        return None  # load_config says what is wrong once a daemon is known
    fits = [name for name, spec in DAEMONS.items()
            if tables and tables <= {f.name for f in dataclasses.fields(spec.load_schema())}]
    return fits[0] if len(fits) == 1 else None


def cmd_config_check(args: argparse.Namespace) -> int:
    from shoal.daemons.runtime.config import ConfigError, load_config

    name = args.daemon or Path(args.file).stem
    if name not in DAEMONS:
        name = _daemon_of(args.file) or name
    if name not in DAEMONS:
        print(
            f"shoal: cannot tell which daemon {args.file} is for; pass --daemon "
            f"({', '.join(DAEMONS)})",
            file=sys.stderr,
        )
        return 2
    spec = DAEMONS[name]
    try:
        config = load_config(args.file, spec.load_schema())
        spec.run_check(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.file}: ok ({name})")
    return 0


def cmd_systemd(args: argparse.Namespace) -> int:
    from shoal.daemons.runtime import systemd

    exe = args.shoal_exe or _shoal_exe()
    if args.action == "render":
        for name, text in systemd.render_units(exe, config_dir=args.config_dir).items():
            print(f"# --- {name}")
            print(text)
        return 0
    try:
        written = systemd.install(
            Path(args.unit_dir),
            shoal_exe=exe,
            config_dir=Path(args.config_dir),
            overwrite_configs=args.overwrite_configs,
        )
    except systemd.UnusableExecutable as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    print(f"now run: {systemd.next_steps()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from shoal.demo.tour import run_demo

    return run_demo(size_mib=args.size_mib, timeout=args.timeout, only=args.only)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shoal", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"shoal {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    daemon_parsers = {}
    for name in DAEMONS:
        d = sub.add_parser(name, help=f"the {name} daemon")
        dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
        run = dsub.add_parser("run", help=f"run the {name} in the foreground (as systemd does)")
        run.add_argument("--config", required=True, help="TOML config file")
        run.set_defaults(func=cmd_run, daemon=name)
        DAEMONS[name].add_commands(dsub, sub)
        daemon_parsers[name] = dsub

    from shoal.lab.commands import add_commands as add_lab_commands

    add_lab_commands(sub, daemon_parsers)

    c = sub.add_parser("config", help="config files")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = csub.add_parser("check", help="validate a config file; exit 2 with one line if it is bad")
    check.add_argument("file")
    check.add_argument("--daemon", choices=sorted(DAEMONS),
                       help="default: the file name's stem, else the daemon whose tables the file has")
    check.set_defaults(func=cmd_config_check)

    s = sub.add_parser("systemd", help="systemd units for this installation")
    s.add_argument("action", choices=["render", "install"])
    s.add_argument("--shoal-exe", help="path of the shoal script (default: this one)")
    s.add_argument("--config-dir", default="/etc/shoal")
    s.add_argument("--unit-dir", default="/etc/systemd/system")
    s.add_argument("--overwrite-configs", action="store_true", help="replace existing config files")
    s.set_defaults(func=cmd_systemd)

    demo = sub.add_parser("demo", help="a live tour on loopback: swarm, telemetry, checkpointing, dispatch")
    demo.add_argument("--size-mib", type=int, default=32, help="size of the file to share (default 32)")
    demo.add_argument("--timeout", type=float, default=120.0, help="give up on a part after this many seconds")
    demo.add_argument("--only", action="append", metavar="PART",
                      help="run only this part of the tour (repeatable; an unknown name lists the parts)")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `shoal systemd render | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
