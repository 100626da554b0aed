"""Message contracts: the named, typed, bounded parameters of an RPC call.

Theory of operation
-------------------
Every RPC method of every daemon takes one map of named parameters and may
return one. The shape of each is written down once, as a frozen, slotted
dataclass deriving from :class:`Contract`, in the protocol module of its
daemon pair (``shoal.protocol.dispatch``, ``shoal.protocol.control``, ...)::

    @dataclass(frozen=True, slots=True)
    class AddTorrent(Contract):
        torrent: bytes = bounded(max_len=MAX_TORRENT)
        dest: str | None = None
        upload_rate: int = bounded(0, min=0, max=MAX_RATE)

``AddTorrent.decode(raw)`` is the only way a handler sees its parameters: it
checks that ``raw`` is a map, that every key is a field (unknown keys are
refused, so a typo is an error rather than a silently ignored option), that
every required field is present, and each value's type and bounds. Anything
wrong raises :class:`BadParams`, a :class:`RemoteProtocolError` whose message
names the field, which the RPC server answers with the one error code every
client knows: ``bad_params``. ``encode()`` is the reverse, for clients.

Supported field types: ``bool``, ``int``, ``float`` (an int is accepted),
``str``, ``bytes``, ``X | None``, ``list[X]``, ``dict[str, X]``, ``Any`` and
another ``Contract`` (a nested map). Bounds, given with :func:`bounded`:
``min``/``max`` for numbers, ``max_len`` for str, bytes and lists (the length
of a str is counted in characters). Every list and string has a bound: a
contract without one is refused when the class is first used.

There is no I/O here and no clock, like the rest of ``shoal.protocol``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Self

from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["BadParams", "Contract", "bounded", "ERROR_CODES"]

#: The error codes every Shoal RPC client may see (``RpcError.code``). A daemon
#: may add domain codes of its own (``not_found``, ``too_many``, ...), listed in
#: its protocol module; these are the shared ones.
ERROR_CODES = {
    "unauthorized": "the handshake failed: no token or a wrong one",
    "bad_params": "a parameter is missing, unknown, of the wrong type or out of bounds",
    "no_such_method": "the daemon has no such method",
    "busy": "too many requests in flight; retry later",
    "timeout": "the handler did not finish within the request timeout",
    "internal": "a bug in the daemon; its log has the traceback",
}


class BadParams(RemoteProtocolError):
    """The caller's parameters do not fit the contract."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="bad_params")


def bounded(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
            max_len: int | None = None) -> Any:
    """A contract field with bounds (and a default, if given)."""
    meta = {"min": min, "max": max, "max_len": max_len}
    if isinstance(default, list | dict):
        raise LocalProtocolError("use None, not a mutable default")
    return dataclasses.field(default=default, metadata=meta)


class _Field(typing.NamedTuple):
    name: str
    tp: Any
    required: bool
    min: float | None
    max: float | None
    max_len: int | None


class Contract:
    """Base of every message contract (see the module docstring)."""

    __slots__ = ()
    _fields_cache: ClassVar[dict[type, tuple[_Field, ...]]] = {}

    @classmethod
    def _fields(cls) -> tuple[_Field, ...]:
        cached = Contract._fields_cache.get(cls)
        if cached is None:
            hints = typing.get_type_hints(cls)
            cached = tuple(
                _Field(f.name, hints[f.name],
                       f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                       f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("max_len"))
                for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            for fld in cached:
                _check_declared(cls, fld, fld.tp)
            Contract._fields_cache[cls] = cached
        return cached

    @classmethod
    def decode(cls, raw: Any) -> Self:
        """Validate a received map; :class:`BadParams` names what is wrong."""
        fields = cls._fields()
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise BadParams(f"expected a map of parameters ({', '.join(f.name for f in fields)})")
        names = {f.name for f in fields}
        unknown = [k for k in raw if k not in names]
        if unknown:
            raise BadParams(f"unknown parameter {str(unknown[0])[:64]!r}; known: {', '.join(sorted(names))}")
        values = {}
        for f in fields:
            if f.name not in raw:
                if f.required:
                    raise BadParams(f"{f.name}: missing")
                continue
            values[f.name] = _convert(f, f.tp, raw[f.name], f.name)
        return cls(**values)

    def encode(self) -> dict[str, Any]:
        """The map to send: nested contracts become maps too."""
        return {f.name: _encode(getattr(self, f.name)) for f in type(self)._fields()}


def _encode(value: Any) -> Any:
    if isinstance(value, Contract):
        return value.encode()
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _check_declared(cls: type, fld: _Field, tp: Any) -> None:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            if arg is not type(None):
                _check_declared(cls, fld, arg)
    elif (tp in (str, bytes) or origin in (list, tuple)) and fld.max_len is None:
        raise LocalProtocolError(f"{cls.__name__}.{fld.name}: a str, bytes or list field needs max_len")


def _convert(f: _Field, tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return _convert(f, others[0], value, where)
        for a in others:
            try:
                return _convert(f, a, value, where)
            except BadParams:
                continue
        raise BadParams(f"{where}: expected {_name(tp)}")
    if origin is list or origin is tuple:
        if not isinstance(value, list | tuple):
            raise BadParams(f"{where}: expected a list")
        if f.max_len is not None and len(value) > f.max_len:
            raise BadParams(f"{where}: at most {f.max_len} items")
        (item,) = typing.get_args(tp)[:1]
        inner = f._replace(max_len=None, min=f.min, max=f.max)
        out = [_convert(inner, item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise BadParams(f"{where}: expected a map with string keys")
        _, item = typing.get_args(tp)
        return {k: _convert(f, item, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Contract):
        try:
            return tp.decode(value)
        except BadParams as exc:
            raise BadParams(f"{where}.{exc}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise BadParams(f"{where}: expected true or false")
        return value
    if tp is int or tp is float:
        ok = isinstance(value, int) if tp is int else isinstance(value, int | float)
        if not ok or isinstance(value, bool) or value != value:  # NaN is never a valid number
            raise BadParams(f"{where}: expected {'an integer' if tp is int else 'a number'}")
        if f.min is not None and value < f.min:
            raise BadParams(f"{where}: must be >= {f.min:g}")
        if f.max is not None and value > f.max:
            raise BadParams(f"{where}: must be <= {f.max:g}")
        return tp(value)
    if tp is str or tp is bytes:
        if not isinstance(value, tp):
            raise BadParams(f"{where}: expected {'a string' if tp is str else 'bytes'}")
        if f.max_len is not None and len(value) > f.max_len:
            raise BadParams(f"{where}: at most {f.max_len} {'characters' if tp is str else 'bytes'}")
        return value
    raise LocalProtocolError(f"{where}: unsupported contract type {tp!r}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)
