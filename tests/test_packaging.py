"""The repository's promises: the README's commands, .ci/run, packaging, the CLI."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHOAL = [sys.executable, "-m", "shoal.cli.main"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^    (bash scripts/setup && .+)$", text, flags=re.M) + re.findall(
        r"^(bash scripts/setup && .+)$", text, flags=re.M
    )


def test_readme_has_the_two_fresh_machine_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    demo = [c for c in commands if c.endswith("shoal demo")]
    tests = [c for c in commands if "pytest" in c]
    assert demo and tests, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests[0] in ci.splitlines(), "the README's test command must be the one .ci/run runs"


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for prefix, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((prefix, *rel)))
    assert found <= listed, f"missing from pyproject packages: {sorted(found - listed)}"


def run(*args, **kw):
    return subprocess.run([*SHOAL, *args], capture_output=True, text=True, timeout=60, **kw)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and re.fullmatch(r"shoal \d+\.\d+\.\d+.*\n", r.stdout)


def test_config_check_accepts_the_shipped_config():
    r = run("config", "check", str(ROOT / "configs" / "tracker.toml"))
    assert r.returncode == 0, r.stderr
    assert "ok (tracker)" in r.stdout


@pytest.mark.parametrize(
    "text, key",
    [
        ("[tracker]\nannounce_intervall = 5\n", "tracker.announce_intervall: unknown key"),
        ("[tracker]\nnumwant_max = -1\n", "tracker.numwant_max: must be at least 1"),
        ("[tracker]\nudp_listen = \"10.0.0.1\"\n", "tracker.udp_listen: expected host:port"),
        ("[access]\nmode = \"whitelist\"\n", "access.whitelist_file: required"),
        ("[access]\npasskeys_file = \"/nonexistent/keys\"\n", "/nonexistent/keys: -: cannot read"),
        ("[daemon\n", "-: invalid TOML"),
    ],
)
def test_config_check_rejects_with_one_line(tmp_path, text, key):
    f = tmp_path / "tracker.toml"
    f.write_text(text)
    r = run("config", "check", str(f))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_daemon_refuses_bad_config_at_start_with_one_line(tmp_path):
    f = tmp_path / "tracker.toml"
    f.write_text("[tracker]\nmin_interval = 4000\n")
    r = run("tracker", "run", "--config", str(f))
    assert r.returncode == 2
    assert r.stderr.strip() == f"{f}: tracker.min_interval: must not exceed announce_interval"


def test_config_check_needs_to_know_the_daemon(tmp_path):
    f = tmp_path / "site.toml"
    f.write_text("")
    r = run("config", "check", str(f))
    assert r.returncode == 2 and "--daemon" in r.stderr
    assert run("config", "check", str(f), "--daemon", "tracker").returncode == 0


def test_bad_command_line_is_a_usage_error():
    r = run("tracker", "run")
    assert r.returncode == 2 and "--config" in r.stderr


def test_systemd_render_uses_the_given_executable():
    r = run("systemd", "render", "--shoal-exe", "/opt/shoal/bin/shoal")
    assert r.returncode == 0
    assert "ExecStart=/opt/shoal/bin/shoal tracker run --config /etc/shoal/tracker.toml" in r.stdout
