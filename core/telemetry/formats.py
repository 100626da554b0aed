"""The files the telemetry daemon and the Flower app pass each other, as bytes.

Theory of operation
-------------------
The telemetry daemon, the Flower ClientApp (run by ``flower-supernode``) and the
ServerApp (run by the fedserver's ``flower-superlink``) never talk to each other
directly: they exchange two kinds of ``.npz`` file (see
``shoal.daemons.fedserver.flowerapp``). Their formats live here, once, as pure
encode/decode functions of bytes; whoever writes a file does it atomically
itself (``shoal.daemons.runtime.state.atomic_write``), and whoever reads one
hands the bytes in.

* **training data** (``train.npz``): ``X``, the raw features of the node's
  training windows (float32, one row per window), and ``features``, their names.
* **global model** (``global.npz`` on a node, ``latest.npz`` on the fedserver):
  the weights ``w0, w1, ...`` (float32, in :class:`~.model.Autoencoder` order) and
  ``meta``, UTF-8 JSON: ``features``, ``run_id``, ``round``, ``time`` (Unix
  seconds, given by the caller) and, in the fedserver's copy, ``nodes``.
* **training mark** (``training.json`` on a node): when the ClientApp's local
  training of a federated round began (``start``, Unix seconds), which process
  runs it (``pid``) and, once it is over, when it ended (``end``). The ClientApp
  writes it before and after its fit; the telemetry daemon reads it when a
  window closes, so the windows the round's training disturbed are not scored
  (``shoal-disturbed``, as for the daemon's own training).

Nothing is unpickled (``allow_pickle=False``): a file from a hostile node is at
worst a :class:`ValueError`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["encode_model_npz", "decode_model_npz", "encode_training_npz", "decode_training_npz",
           "encode_training_mark", "decode_training_mark"]

#: a training mark is a few dozen bytes; a larger file is not one (read no further)
MAX_TRAINING_MARK_BYTES = 4096


def encode_model_npz(weights: Sequence[np.ndarray], features: Sequence[str], run_id: int, rnd: int, *,
                     now: float, nodes: int | None = None) -> bytes:
    """A global model file: the weights and its metadata (``now`` is its ``time``)."""
    buf = io.BytesIO()
    arrays = {f"w{i}": np.asarray(w, np.float32) for i, w in enumerate(weights)}
    meta: dict[str, Any] = {"features": list(features), "run_id": int(run_id), "round": int(rnd), "time": now}
    if nodes is not None:
        meta["nodes"] = int(nodes)  # how many nodes took part (the fedserver's copy only)
    text = json.dumps(meta)
    np.savez(buf, meta=np.frombuffer(text.encode(), np.uint8), **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def decode_model_npz(data: bytes) -> tuple[list[np.ndarray], dict[str, Any]]:
    """-> (weights, meta); raises ValueError on anything malformed."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            n = len([k for k in z.files if k.startswith("w")])
            weights = [z[f"w{i}"] for i in range(n)]
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise ValueError(f"not a global model file: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("features"), list) or not weights:
        raise ValueError("global model file lacks features or weights")
    return weights, meta


def encode_training_npz(X: np.ndarray, features: Sequence[str]) -> bytes:
    """A node's training data file: raw feature rows and their names."""
    buf = io.BytesIO()
    np.savez(buf, X=np.asarray(X, np.float32), features=np.array(list(features), dtype=str))
    return buf.getvalue()


def decode_training_npz(data: bytes) -> tuple[np.ndarray, list[str]]:
    """-> (X, feature names)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return z["X"], [str(f) for f in z["features"]]


def encode_training_mark(start: float, pid: int, end: float | None = None) -> bytes:
    """The ClientApp's training mark: in progress (``end`` None) or over."""
    mark: dict[str, Any] = {"start": float(start), "pid": int(pid)}
    if end is not None:
        mark["end"] = float(end)
    return json.dumps(mark).encode()


def decode_training_mark(data: bytes) -> tuple[float, int, float | None]:
    """-> (start, pid, end or None while training); raises ValueError on anything malformed."""
    if len(data) > MAX_TRAINING_MARK_BYTES:
        raise ValueError(f"not a training mark: {len(data)} bytes")
    try:
        mark = json.loads(data.decode())
        start, pid, end = float(mark["start"]), int(mark["pid"]), mark.get("end")
        end = None if end is None else float(end)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a training mark: {exc}") from None
    if not (math.isfinite(start) and (end is None or (math.isfinite(end) and end >= start)) and pid > 0):
        raise ValueError("not a training mark: start, end or pid out of range")
    return start, pid, end
