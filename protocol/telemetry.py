"""The telemetry and fedserver RPC contracts: every method's parameters, written down once.

Theory of operation
-------------------
Two daemons, two RPC services, one module:

* the telemetry daemon's **control socket** (``shoal telemetry ...``):
  ``status`` (:class:`Status`), ``label`` (:class:`Label`), ``train``
  (:class:`Train`) and ``install`` (:class:`Install`);
* the fedserver's **RPC** (``shoal fed ...``, and the telemetry daemon's
  catch-up): ``run`` (:class:`Run`), ``latest`` and ``status`` (no parameters).

The RPC server decodes each request with its contract before the handler
runs (``shoal.daemons.runtime.rpc.rpc_method``), so anything missing, unknown,
mistyped or out of bounds is answered ``bad_params`` naming the field.
Checks that need the daemon's state stay in the daemon and have their own
error codes (:data:`ERROR_CODES`).

No I/O and no clock here, like the rest of ``shoal.protocol``.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.protocol.contract import BadParams, Contract, bounded

__all__ = [
    "ERROR_CODES",
    "MAX_STATUS_WINDOWS",
    "MAX_MODEL_RPC_BYTES",
    "MAX_LABEL_PARAM",
    "MAX_EPOCHS",
    "MAX_BATCH_SIZE",
    "MAX_ROUNDS",
    "Status",
    "Label",
    "Train",
    "Install",
    "Run",
]

#: Domain error codes of the two services (besides contract.ERROR_CODES).
ERROR_CODES = {
    "bad_label": "telemetry label: the label is not a short token of letters, digits, '-', '_', '.'",
    "train_failed": "telemetry train: too few training windows, or training failed",
    "model_refused": "telemetry install: the model is corrupt, lacks metadata or does not fit this node",
    "run_failed": "fedserver run: the federated run did not produce a model",
}

MAX_STATUS_WINDOWS = 1000  # recent windows one status reply lists (each a small map)
# `install` carries a model in one RPC frame (1 MiB); a 460-feature seed model is ~370 KB.
MAX_MODEL_RPC_BYTES = 1 << 20
# A label's own rule (store.MAX_LABEL_LEN, 64 characters) is the store's, answered `bad_label`;
# this bound only keeps a hostile request from handing the daemon an unbounded string.
MAX_LABEL_PARAM = 1024
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 65536
MAX_ROUNDS = 1000


# -- telemetry control ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status(Contract):
    """``status``: the node's model, sources and its ``windows`` most recent windows."""

    windows: int = bounded(20, min=0, max=MAX_STATUS_WINDOWS)


@dataclass(frozen=True, slots=True)
class Label(Contract):
    """``label``: label the windows in [start, end] (None or "" clears)."""

    start: float
    end: float
    label: str | None = bounded(None, max_len=MAX_LABEL_PARAM)


@dataclass(frozen=True, slots=True)
class Train(Contract):
    """``train``: train the node's autoencoder; None takes the config's [training] value."""

    epochs: int | None = bounded(None, min=1, max=MAX_EPOCHS)
    lr: float | None = bounded(None, min=0, max=1)
    batch_size: int | None = bounded(None, min=1, max=MAX_BATCH_SIZE)

    def __post_init__(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise BadParams("lr: must be > 0")


@dataclass(frozen=True, slots=True)
class Install(Contract):
    """``install``: an ONNX model file with shoal metadata."""

    model: bytes = bounded(max_len=MAX_MODEL_RPC_BYTES)


# -- fedserver -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run(Contract):
    """``run``: one federated run of ``rounds`` rounds (None: the server's [federation] rounds)."""

    rounds: int | None = bounded(None, min=1, max=MAX_ROUNDS)
