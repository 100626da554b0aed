"""The one config loader: TOML validated into frozen dataclasses.

Theory of operation
-------------------
A daemon's config schema is a tree of frozen dataclasses. Each field's type
annotation says what the TOML value must be, and :func:`setting` adds bounds
(``min``, ``max``, ``choices``) and a help text. :func:`load_config` walks the
schema and the parsed TOML side by side:

* an unknown key is an error (a typo must not silently fall back to a default);
* a missing key takes the field's default; for a nested table, missing keys
  take their values from the field's default *instance*, so a daemon can give
  its ``[daemon]`` section its own defaults (its metrics port, say);
* a value of the wrong type or out of bounds is an error;
* a schema's ``__post_init__`` may raise ``ValueError("key: reason")`` for
  rules that span several keys.

Every error is one :class:`ConfigError` whose ``str()`` is a single line,
``FILE: KEY: reason``, fit for stderr at start or the journal on reload.

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Path``,
:class:`ListenAddr`, ``Literal[...]``, ``tuple[T, ...]`` (a TOML array), a
nested dataclass (a TOML table), and ``T | None`` where an empty string in
TOML means ``None`` (TOML has no null).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "DaemonSection",
    "ListenAddr",
    "load_config",
    "build_config",
    "parse_config",
    "read_config_text",
    "setting",
]

# A config file is a few kilobytes; anything far larger is a mistake (or a
# device file passed by accident), not a config.
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(Exception):
    """A config problem, rendered as one line: ``FILE: KEY: reason``."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


class ListenAddr(NamedTuple):
    """A host and port to listen on or connect to; port 0 means "any free port"."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @classmethod
    def parse(cls, text: str) -> ListenAddr:
        """Parse ``host:port`` or ``[v6]:port``; raise ValueError with the reason."""
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"expected [ipv6]:port, got {text!r}")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"expected host:port, got {text!r}")
        if host != "localhost":
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address (or localhost)") from None
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"port must be 0..65535, got {port_text!r}")
        return cls(host, int(port_text))


def setting(
    default: Any = dataclasses.MISSING,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[Any, ...] | None = None,
    help: str = "",
) -> Any:
    """A dataclass field with bounds that :func:`load_config` enforces."""
    meta = {"min": min, "max": max, "choices": choices, "help": help}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True, slots=True)
class DaemonSection:
    """The ``[daemon]`` table that every daemon's config has."""

    log_level: str = setting("info", choices=("debug", "info", "warning", "error"))
    # None disables the endpoint. Each daemon's schema gives its own default port.
    metrics_listen: ListenAddr | None = setting(ListenAddr("127.0.0.1", 0))
    # A graceful stop that takes longer than this is cut short (systemd's
    # TimeoutStopSec should be a little larger).
    stop_timeout: float = setting(10.0, min=0.1, max=600.0)
    # Where durable state lives; empty means $STATE_DIRECTORY, or ./state/<name>.
    state_directory: str = setting("")


def load_config(path: str | Path, schema: type[T]) -> T:
    """Read and validate a TOML file into ``schema``; raise :class:`ConfigError`."""
    return parse_config(read_config_text(path), schema, source=str(path))


def read_config_text(path: str | Path) -> str:
    """A config file's text: readable, at most MAX_CONFIG_BYTES, UTF-8; else :class:`ConfigError`."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, "-", f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(source, "-", f"larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "-", f"not UTF-8 (byte {exc.start})") from None
    return text


def parse_config(text: str, schema: type[T], *, source: str = "<string>") -> T:
    """Validate TOML text into ``schema``; raise :class:`ConfigError`."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "-", f"invalid TOML: {exc}") from None
    return _build(schema, table, None, source, "")


def build_config(table: dict[str, Any], schema: type[T], *, source: str, prefix: str = "") -> T:
    """Validate an already parsed TOML table (or a part of one) into ``schema``.

    For files whose tables are pre-processed before validation (a lab scenario
    merges its link defaults into each host's link first); ``prefix`` names
    where the table sits in the file, for the error's key.
    """
    return _build(schema, table, None, source, prefix)


def _build(schema: type[T], table: dict[str, Any], base: Any, source: str, prefix: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]  # T is a dataclass
    hints = typing.get_type_hints(schema)
    for key in table:
        if key not in fields:
            raise ConfigError(source, prefix + key, "unknown key")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        key = prefix + name
        if name in table:
            values[name] = _convert(hints[name], table[name], field, source, key)
        elif base is not None:
            values[name] = getattr(base, name)
        elif field.default is not dataclasses.MISSING:
            values[name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[name] = field.default_factory()
        else:
            raise ConfigError(source, key, "required key is missing")
    try:
        return schema(**values)
    except ValueError as exc:
        sub, sep, reason = str(exc).partition(": ")
        if sep and sub in fields:
            raise ConfigError(source, prefix + sub, reason) from None
        raise ConfigError(source, prefix.rstrip(".") or "-", str(exc)) from None


def _convert(tp: Any, value: Any, field: dataclasses.Field, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value == "" and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) != 1:
            raise TypeError(f"unsupported config type {tp!r} for {key}")
        tp, origin = args[0], typing.get_origin(args[0])
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(source, key, "expected a table")
        base = field.default if dataclasses.is_dataclass(field.default) else None
        return _build(tp, value, base, source, key + ".")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(source, key, "expected an array")
        plain = dataclasses.field(metadata=field.metadata)
        return tuple(
            _convert(item_tp, item, plain, source, f"{key}[{i}]") for i, item in enumerate(value)
        )
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            allowed = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(source, key, f"must be one of {allowed}, got {value!r}")
        return value
    result = _scalar(tp, value, source, key)
    _check_bounds(result, field.metadata, source, key)
    return result


def _scalar(tp: Any, value: Any, source: str, key: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(source, key, f"expected a path, got {value!r}")
        return Path(value)
    if tp is ListenAddr:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected \"host:port\", got {value!r}")
        try:
            return ListenAddr.parse(value)
        except ValueError as exc:
            raise ConfigError(source, key, str(exc)) from None
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], source: str, key: str) -> None:
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if lo is not None and value < lo:
        raise ConfigError(source, key, f"must be at least {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(source, key, f"must be at most {hi}, got {value!r}")
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(source, key, f"must be one of {allowed}, got {value!r}")


#: The shortest RPC token accepted anywhere (an HMAC-SHA256 key; 16 bytes = 128 bits).
MIN_TOKEN_BYTES = 16


def read_token(path: str | Path | None, key: str) -> bytes | None:
    """The one token reader: the RPC token in ``path``, surrounding whitespace stripped.

    None (or "") means no token. An unreadable file or one shorter than
    :data:`MIN_TOKEN_BYTES` is a :class:`ConfigError` naming the file and the
    config key (or CLI option) ``key`` that named it: one line, never a traceback.
    """
    if path is None or str(path) == "":
        return None
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(str(path), key, f"cannot read the token: {exc.strerror or exc}") from None
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(str(path), key, f"the token must be at least {MIN_TOKEN_BYTES} bytes, got {len(token)}")
    return token
