"""The config loader: types, bounds, nested defaults, and one-line errors."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from shoal.daemons.runtime.config import (
    ConfigError,
    DaemonSection,
    ListenAddr,
    load_config,
    parse_config,
    setting,
)


@dataclass(frozen=True, slots=True)
class Inner:
    size: int = setting(4, min=1, max=10)
    ratio: float = setting(0.5, min=0.0, max=1.0)
    name: str = setting("x", choices=("x", "y"))


@dataclass(frozen=True, slots=True)
class Schema:
    daemon: DaemonSection = setting(DaemonSection(metrics_listen=ListenAddr("127.0.0.1", 9999)))
    inner: Inner = setting(Inner())
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    path: Path | None = setting(None)
    listen: ListenAddr | None = setting(ListenAddr("127.0.0.1", 1))
    nets: tuple[str, ...] = setting(("10.0.0.0/8",))
    sizes: tuple[int, ...] = setting((), min=0)

    def __post_init__(self):
        if self.flag and self.path is None:
            raise ValueError("path: required when flag is true")


def parse(text: str) -> Schema:
    return parse_config(text, Schema, source="x.toml")


def test_empty_file_is_all_defaults():
    assert parse("") == Schema()


def test_values_are_converted():
    c = parse(
        'mode = "b"\nflag = true\npath = "/var/x"\nlisten = "[::1]:80"\nnets = []\nsizes = [1, 2]\n'
        "[inner]\nratio = 1\n"
    )
    assert c.mode == "b" and c.flag and c.path == Path("/var/x")
    assert c.listen == ListenAddr("::1", 80) and str(c.listen) == "[::1]:80" and c.listen.is_loopback
    assert c.nets == () and c.sizes == (1, 2)
    assert c.inner == Inner(ratio=1.0) and isinstance(c.inner.ratio, float)


def test_nested_table_keeps_the_schema_default_instance_for_missing_keys():
    c = parse('[daemon]\nlog_level = "debug"\n')
    assert c.daemon.log_level == "debug"
    assert c.daemon.metrics_listen == ListenAddr("127.0.0.1", 9999)  # the schema's, not DaemonSection's


def test_empty_string_means_none_for_optionals():
    assert parse('listen = ""\n').listen is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus = 1\n", "x.toml: bogus: unknown key"),
        ("[inner]\nbogus = 1\n", "x.toml: inner.bogus: unknown key"),
        ("[inner]\nsize = 0\n", "x.toml: inner.size: must be at least 1, got 0"),
        ("[inner]\nsize = 11\n", "x.toml: inner.size: must be at most 10, got 11"),
        ('[inner]\nsize = "4"\n', "x.toml: inner.size: expected an integer, got '4'"),
        ("[inner]\nsize = true\n", "x.toml: inner.size: expected an integer, got True"),
        ('[inner]\nname = "z"\n', "x.toml: inner.name: must be one of 'x', 'y', got 'z'"),
        ('mode = "c"\n', "x.toml: mode: must be one of 'a', 'b', got 'c'"),
        ("flag = 1\n", "x.toml: flag: expected true or false, got 1"),
        ("flag = true\n", "x.toml: path: required when flag is true"),
        ('listen = "localhost"\n', "x.toml: listen: expected host:port, got 'localhost'"),
        ('listen = "example.com:80"\n', "x.toml: listen: 'example.com' is not an IP address (or localhost)"),
        ('listen = "127.0.0.1:70000"\n', "x.toml: listen: port must be 0..65535, got '70000'"),
        ("sizes = [1, -1]\n", "x.toml: sizes[1]: must be at least 0, got -1"),
        ('nets = "10.0.0.0/8"\n', "x.toml: nets: expected an array"),
        ("inner = 3\n", "x.toml: inner: expected a table"),
        ("mode = \n", "x.toml: -: invalid TOML"),
    ],
)
def test_errors_are_one_line_naming_file_and_key(text, message):
    with pytest.raises(ConfigError) as exc:
        parse(text)
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.toml: -: cannot read"):
        load_config(tmp_path / "nope.toml", Schema)
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"mode = \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad, Schema)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big, Schema)
    ok = tmp_path / "ok.toml"
    ok.write_text('mode = "b"\n')
    assert load_config(ok, Schema).mode == "b"
