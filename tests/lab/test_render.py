"""`shoal lab render`: a scenario becomes per-host configs, shared secrets, units and a scrape config.

One scenario with all seven daemons over five hosts is rendered twice, for a
LAN (configs under /etc/shoal) and for the emulated lab (configs read where
they are rendered); every rendered file must load with its daemon's schema and
pass its check, and the two renderings must differ only in the paths.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shoal.daemons.fedserver.daemon import check_names_loopback
from shoal.daemons.runtime.config import ConfigError, ListenAddr, load_config, read_token
from shoal.daemons.runtime.registry import DAEMONS, METRICS_PORTS
from shoal.lab.render import Bundle, render, toml_dumps
from shoal.lab.scenario import parse_scenario

SCENARIO = """
[lab]
subnet = "198.18.0.0/24"

[monitor]
host = "mon"
scrape_interval = 0.5

[[host]]
name = "mon"
daemons = ["tracker", "fedserver", "dispatcher", "telemetry"]

[[host]]
name = "ckpt"                 # ckpt1 the coordinator, ckpt2 its backup
count = 2
daemons = ["checkpoint", "peer", "telemetry"]

[[host]]
name = "node"
count = 2
daemons = ["peer", "worker", "telemetry"]
[host.config.peer.limits]
upload_rate = 1000000
[host.config.worker.worker]
slots = 3
"""

HOSTS = ["mon", "ckpt1", "ckpt2", "node1", "node2"]
EMULATED = "{out}/hosts/{{host}}/etc/shoal"


def scenario(text: str = SCENARIO):
    return parse_scenario(text, source="lab.toml")


def with_config(s, host: str, overrides: dict):
    """``s`` with ``host``'s config overrides replaced."""
    return dataclasses.replace(s, hosts=tuple(
        dataclasses.replace(h, config={**h.config, **overrides}) if h.name == host else h for h in s.hosts))


def emulated(out: Path, s=None, **kw) -> Bundle:
    return render(s or scenario(), out, config_root=EMULATED.format(out=out), **kw)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Bundle, Bundle]:
    """(LAN, emulated) renderings of SCENARIO."""
    root = tmp_path_factory.mktemp("render")
    return render(scenario(), root / "lan"), emulated(root / "emu")


@pytest.fixture(scope="module")
def lan(bundles) -> Bundle:
    return bundles[0]


@pytest.fixture(scope="module")
def emu(bundles) -> Bundle:
    return bundles[1]


def config(bundle: Bundle, host: str, daemon: str):
    return load_config(bundle.plan(host, daemon).config, DAEMONS[daemon].load_schema())


def test_every_host_gets_its_daemons_in_start_order(emu):
    s = scenario()
    assert list(emu.plans) == HOSTS
    for h in s.hosts:
        assert sorted(p.daemon for p in emu.plans[h.name]) == sorted(h.daemons)
        for p in emu.plans[h.name]:
            assert p.config == emu.root / "hosts" / h.name / "etc" / "shoal" / f"{p.daemon}.toml"
    assert [p.daemon for p in emu.plans["mon"]] == ["tracker", "dispatcher", "fedserver", "telemetry"]
    assert [p.daemon for p in emu.plans["node1"]] == ["peer", "telemetry", "worker"]
    order = [(p.host, p.daemon) for p in emu.start_order()]
    assert order[0] == ("mon", "tracker")
    assert order.index(("ckpt2", "checkpoint")) < order.index(("ckpt1", "checkpoint"))  # backup first
    assert order.index(("mon", "dispatcher")) < order.index(("node1", "worker"))
    assert order.index(("mon", "fedserver")) < min(order.index((h, "telemetry")) for h in HOSTS)
    assert len(order) == sum(len(h.daemons) for h in s.hosts)


def test_every_config_loads_and_passes_its_check(lan, emu):
    for bundle in (lan, emu):
        for host, plans in bundle.plans.items():
            for p in plans:
                cfg = config(bundle, host, p.daemon)
                if bundle is emu:  # the LAN files name /etc/shoal/..., not on this machine
                    DAEMONS[p.daemon].run_check(cfg)


def test_every_listener_is_on_the_host_address_at_its_default_port(emu):
    s = scenario()
    for host, plans in emu.plans.items():
        addr = s.address(host)
        for p in plans:
            assert p.metrics == f"{addr}:{METRICS_PORTS[p.daemon]}"
            assert config(emu, host, p.daemon).daemon.metrics_listen == ListenAddr(addr, METRICS_PORTS[p.daemon])
            assert config(emu, host, p.daemon).daemon.state_directory == ""
            for key, target in p.ports.items():
                assert ListenAddr.parse(target).host == addr, (host, p.daemon, key)
    assert emu.plan("mon", "tracker").ports == {"http": "198.18.0.1:6969", "udp": "198.18.0.1:6969"}
    assert emu.plan("mon", "dispatcher").ports == {"rpc": "198.18.0.1:7460"}
    assert emu.plan("mon", "fedserver").ports == {"fleet": "198.18.0.1:7443", "rpc": "198.18.0.1:7444"}
    assert emu.plan("ckpt1", "checkpoint").ports == {"rpc": "198.18.0.2:7745"}
    assert emu.plan("ckpt2", "checkpoint").ports == {"backup": "198.18.0.3:7746"}
    assert emu.plan("node1", "peer").ports == {"peer": "198.18.0.4:6881"}
    assert emu.plan("node1", "worker").ports == {}


def test_daemons_point_at_each_other(emu):
    coordinator, backup = config(emu, "ckpt1", "checkpoint"), config(emu, "ckpt2", "checkpoint")
    assert coordinator.checkpoint.role == "coordinator" and backup.checkpoint.role == "backup"
    assert str(coordinator.checkpoint.backup) == emu.plan("ckpt2", "checkpoint").ports["backup"]
    assert backup.checkpoint.backup is None
    for n in ("node1", "node2"):
        w = config(emu, n, "worker").worker
        assert str(w.dispatcher) == emu.plan("mon", "dispatcher").ports["rpc"]
        assert w.token_file == emu.token("dispatcher", n)
        assert w.id == n  # unique per worker, though they share one machine's host name
        assert w.task_user == "nobody"
        assert w.telemetry_metrics == f"http://{emu.plan(n, 'telemetry').metrics}/metrics"
    fed = config(emu, "mon", "fedserver")
    assert fed.superlink.supernode_auth and fed.superlink.listen == ListenAddr("198.18.0.1", 7443)
    for h in HOSTS:
        f = config(emu, h, "telemetry").federation
        assert f.enabled
        assert str(f.superlink) == emu.plan("mon", "fedserver").ports["fleet"]
        assert f.fedserver == emu.plan("mon", "fedserver").ports["rpc"]
        assert Path(f.token_file) == emu.token("fedserver", h)
        assert Path(f.root_certificates).read_bytes() == Path(fed.superlink.ssl_ca_certfile).read_bytes()
    exempt = config(emu, "mon", "tracker").access.rate_limit_exempt
    assert "198.18.0.0/24" in exempt and "127.0.0.0/8" in exempt


def test_tokens_are_shared_long_and_private(emu):
    everywhere = {"checkpoint": HOSTS, "dispatcher": HOSTS, "fedserver": HOSTS}  # every host runs telemetry
    for name, hosts in everywhere.items():
        contents = {emu.token(name, h).read_bytes() for h in hosts}
        assert len(contents) == 1, name
        for h in hosts:
            path = emu.token(name, h)
            assert path.stat().st_mode & 0o777 == 0o600
            assert len(read_token(path, "test")) >= 16
    assert len({emu.token(n, "mon").read_bytes() for n in everywhere}) == 3  # one secret per purpose
    assert config(emu, "ckpt1", "checkpoint").checkpoint.token_file == emu.token("checkpoint", "ckpt1")
    assert config(emu, "ckpt2", "checkpoint").checkpoint.token_file == emu.token("checkpoint", "ckpt2")
    assert config(emu, "mon", "dispatcher").dispatcher.token_file == emu.token("dispatcher", "mon")
    assert Path(config(emu, "mon", "fedserver").rpc.token_file) == emu.token("fedserver", "mon")


def test_the_fedserver_token_stays_with_the_federation(tmp_path):
    s = scenario(SCENARIO.replace('daemons = ["peer", "worker", "telemetry"]', 'daemons = ["peer", "worker"]'))
    b = emulated(tmp_path, s)
    assert b.token("dispatcher", "node1").read_bytes() == b.token("dispatcher", "mon").read_bytes()
    with pytest.raises(KeyError):
        b.token("fedserver", "node1")
    assert not (tmp_path / "hosts" / "node1" / "etc" / "shoal" / "keys").exists()


def test_certificates_name_the_fedserver_and_keys_authenticate_every_node(emu):
    fed = config(emu, "mon", "fedserver").superlink
    cert = x509.load_pem_x509_certificate(Path(fed.ssl_certfile).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(fed.ssl_ca_certfile).read_bytes())
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress)
    assert ipaddress.ip_address("198.18.0.1") in ips
    cert.verify_directly_issued_by(ca)
    check_names_loopback(fed.ssl_certfile)  # the fedserver's own start check
    assert Path(fed.ssl_keyfile).stat().st_mode & 0o777 == 0o600
    authorized = [line for line in Path(fed.authorized_keys).read_text().splitlines()
                  if line and not line.startswith("#")]
    assert len(authorized) == len(HOSTS)
    for h in HOSTS:
        key_file = Path(config(emu, h, "telemetry").federation.auth_private_key)
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        key = serialization.load_ssh_private_key(key_file.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        assert sum(line.startswith(public.decode() + " ") for line in authorized) == 1, h


def test_lan_and_emulated_renderings_differ_only_in_paths(lan, emu):
    def files(b: Bundle) -> set[Path]:
        return {p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file()}

    assert files(lan) == files(emu)
    secret = ("tokens/", "tls/", "keys/")
    compared = 0
    for rel in sorted(files(lan)):
        if any(s in str(rel) for s in secret):
            continue  # generated anew by each render
        a, b = (lan.root / rel).read_text(), (emu.root / rel).read_text()
        if rel.parts[0] == "hosts":
            # the host's file system root: /etc/shoal and the peer's socket under /var/lib
            b = b.replace(f"{emu.root}/hosts/{rel.parts[1]}/", "/")
        b = b.replace(EMULATED.format(out=emu.root), "/etc/shoal")
        assert a == b, rel
        compared += 1
    assert compared > 30
    # and the paths did differ: every config file name is under each one's root
    assert "/etc/shoal/tokens/dispatcher.token" in lan.plan("node1", "worker").config.read_text()
    assert f"{emu.root}/hosts/node1/etc/shoal/tokens/" in emu.plan("node1", "worker").config.read_text()


def test_units_are_the_hosts_and_read_config_root(lan, emu):
    for bundle, root in ((lan, "/etc/shoal"), (emu, None)):
        for host, plans in bundle.plans.items():
            folder = bundle.root / "hosts" / host / "systemd"
            assert {p.name for p in folder.iterdir()} == {DAEMONS[p.daemon].unit for p in plans} | {"shoal.target"}
            for p in plans:
                text = (folder / DAEMONS[p.daemon].unit).read_text()
                where = root or str(bundle.root / "hosts" / host / "etc" / "shoal")
                assert f"ExecStart=/usr/local/bin/shoal {p.daemon} run --config {where}/{p.daemon}.toml" in text


def test_prometheus_scrapes_every_daemon_and_passes_promtool(emu):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian package prometheus; .ci/run installs it)"
    proc = subprocess.run([promtool, "check", "config", emu.prometheus.name], cwd=emu.prometheus.parent,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = yaml.safe_load(emu.prometheus.read_text())
    assert doc["global"]["scrape_interval"] == "500ms"
    assert [emu.prometheus.parent / r for r in doc["rule_files"]] == emu.rules
    assert [r.name for r in emu.rules] == ["alerts.yml"]
    shipped = Path(__file__).resolve().parents[2] / "configs" / "prometheus" / "alerts.yml"
    assert emu.rules[0].read_text() == shipped.read_text()
    seen = {}
    for job in doc["scrape_configs"]:
        assert job["job_name"].startswith("shoal-")
        for sc in job["static_configs"]:
            for target in sc["targets"]:
                seen[target] = (job["job_name"], sc["labels"]["host"])
    expected = {p.metrics: (f"shoal-{p.daemon}", p.host) for ps in emu.plans.values() for p in ps}
    assert seen == expected


def test_scrape_interval_may_be_overridden(tmp_path):
    b = emulated(tmp_path, scrape_interval=15.0)
    doc = yaml.safe_load(b.prometheus.read_text())
    assert doc["global"]["scrape_interval"] == "15s" and doc["global"]["scrape_timeout"] == "10s"


def test_manifest_and_readme(emu):
    m = json.loads((emu.root / "manifest.json").read_text())
    assert [h["name"] for h in m["hosts"]] == HOSTS
    by = {h["name"]: h for h in m["hosts"]}
    assert by["ckpt2"]["address"] == "198.18.0.3"
    ckpt = {d["daemon"]: d for d in by["ckpt2"]["daemons"]}["checkpoint"]
    assert ckpt["role"] == "backup" and ckpt["ports"] == {"backup": "198.18.0.3:7746"}
    assert m["monitor"]["prometheus"] == "monitor/prometheus.yml"
    readme = (emu.root / "README").read_text()
    assert "hosts/<host>/etc/shoal" in readme and "monitor/prometheus.yml" in readme


def test_overrides_are_merged_over_the_wiring(emu):
    for n in ("node1", "node2"):
        assert config(emu, n, "peer").limits.upload_rate == 1_000_000
        assert config(emu, n, "peer").peer.listen == ListenAddr(scenario().address(n), 6881)  # kept
        assert config(emu, n, "worker").worker.slots == 3
    assert config(emu, "ckpt1", "peer").limits.upload_rate == 0


def test_an_override_of_an_address_reaches_the_daemons_that_dial_it(tmp_path):
    # (set on the Host: the scenario loader checks an override alone against the schema's
    # defaults, and refuses an off-loopback rpc_listen without the token_file rendered here)
    s = with_config(scenario(), "mon", {"dispatcher": {"dispatcher": {"rpc_listen": "198.18.0.1:7999"}}})
    b = emulated(tmp_path, s)
    assert b.plan("mon", "dispatcher").ports == {"rpc": "198.18.0.1:7999"}
    assert str(config(b, "node1", "worker").worker.dispatcher) == "198.18.0.1:7999"


def test_an_override_that_breaks_the_wiring_is_refused_in_one_line(tmp_path):
    s = scenario(SCENARIO.replace('count = 2\ndaemons = ["peer", "worker", "telemetry"]',
                                  'count = 2\ndaemons = ["peer", "worker", "telemetry"]\n'
                                  '[host.config.telemetry.federation]\nauth_private_key = ""'))
    with pytest.raises(ConfigError) as err:
        emulated(tmp_path, s)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("lab.toml: host node1: config.telemetry.federation.root_certificates: ")
    assert "node authentication (auth_private_key)" in message


def test_a_bad_override_value_is_refused_naming_the_key(tmp_path):
    s = with_config(scenario(), "node2", {"peer": {"limits": {"upload_rate": -5}}})
    with pytest.raises(ConfigError) as err:
        emulated(tmp_path, s)
    assert list(tmp_path.iterdir()) == []  # no half bundle, no secrets left behind
    assert "\n" not in str(err.value)
    assert "host node2: config.peer.limits.upload_rate: must be at least 0" in str(err.value)


def test_the_lan_rendering_validates_against_its_own_files(tmp_path):
    s = with_config(scenario(), "mon", {"dispatcher": {"dispatcher": {"token_file": ""}}})
    with pytest.raises(ConfigError, match=r"host mon: config.dispatcher.dispatcher.token_file: required"):
        render(s, tmp_path / "lan")


@pytest.mark.parametrize("change, error", [
    (lambda t: t.replace('daemons = ["checkpoint", "peer", "telemetry"]',
                         'daemons = ["checkpoint", "peer", "telemetry", "dispatcher"]'),
     "3 hosts run dispatcher (mon, ckpt1, ckpt2); a lab renders one dispatcher"),
    (lambda t: t.replace('"fedserver", "dispatcher", ', '"fedserver", '),
     "workers need a host that runs the dispatcher"),
    (lambda t: t.replace('daemons = ["peer", "worker", "telemetry"]', 'daemons = ["peer", "worker", "checkpoint"]'),
     "4 hosts run checkpoint"),
])
def test_scenarios_that_cannot_be_wired_are_refused(tmp_path, change, error):
    with pytest.raises(ConfigError, match=re.escape(error)):
        emulated(tmp_path, scenario(change(SCENARIO)))


@pytest.mark.parametrize("kw", [{"config_root": "etc/shoal"}, {"config_root": "/etc/my shoal"},
                                {"exe": "shoal"}])
def test_paths_the_units_cannot_name_are_refused(tmp_path, kw):
    with pytest.raises(ConfigError, match="^lab.toml: render: .* must be an absolute path"):
        render(scenario(), tmp_path / "b", **kw)
    assert not (tmp_path / "b").exists()


def test_telemetry_without_a_fedserver_keeps_federation_off(tmp_path):
    b = emulated(tmp_path, scenario("[[host]]\nname = \"solo\"\ndaemons = [\"telemetry\", \"peer\"]\n"))
    assert not config(b, "solo", "telemetry").federation.enabled
    assert not (tmp_path / "hosts" / "solo" / "etc" / "shoal" / "tokens").exists()


def test_out_is_replaced_only_when_it_holds_a_bundle(tmp_path):
    first = emulated(tmp_path / "b")
    old = first.token("dispatcher", "mon").read_bytes()
    (tmp_path / "b" / "hosts" / "gone").mkdir()
    second = emulated(tmp_path / "b")
    assert second.token("dispatcher", "mon").read_bytes() != old  # fresh secrets
    assert not (tmp_path / "b" / "hosts" / "gone").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and not a rendered bundle"):
        emulated(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_toml_writer_round_trips():
    doc = {
        "top": 1,
        "a": {"s": 'quote " backslash \\ tab \t newline \n del \x7f nul \x00 é 🐟', "i": -3, "f": 1e-9,
              "big": 1e300, "b": True, "l": ["x", 2, 3.5, False], "empty": [], "p": Path("/etc/shoal"),
              "odd key": "v"},
        "n": {"deep": {"er": {"x": 0.1}}, "y": ""},
        "t": {},
    }
    back = tomllib.loads(toml_dumps(doc, header="line one\nline two"))
    assert back == {**doc, "a": {**doc["a"], "p": "/etc/shoal"}}
    with pytest.raises(TypeError):
        toml_dumps({"x": object()})
