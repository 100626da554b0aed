"""Learned policies' weights as bytes: the one save/load for the dispatcher and the worker.

Both daemons keep their policies' ``state_dict()`` in a msgpack file under the
state directory (written by the runtime's ``StateSaver``). The file holds a
map ``{policy name: state}``: the dispatcher keeps one entry per dispatch
policy it has used, the worker one for its queue policy. No I/O here: the
daemon reads the file and hands the bytes in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import msgpack

__all__ = ["Learner", "pack_states", "unpack_states", "restore"]


class Learner(Protocol):
    name: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


def pack_states(states: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The file's bytes for ``{policy name: state_dict}``."""
    return msgpack.packb(dict(states), use_bin_type=True)


def unpack_states(blob: bytes | None) -> dict[str, Any]:
    """``{policy name: state_dict}`` from the file's bytes (None: no file); ValueError if unreadable."""
    if blob is None:
        return {}
    try:
        data = msgpack.unpackb(blob, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a saved policy state ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("not a saved policy state (expected a map)")
    if isinstance(data.get("policy"), str):  # a worker's file before the map: one policy's state_dict
        return {data["policy"]: data}
    return data


def restore(policy: Learner, states: Mapping[str, Any]) -> bool:
    """Load ``policy``'s saved state if there is one; True if loaded, ValueError if it does not fit."""
    state = states.get(policy.name)
    if state is None:
        return False
    try:
        policy.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    return True
