"""The telemetry and fedserver RPC contracts: every method's parameters, written down once.

Theory of operation
-------------------
Two daemons, two RPC services, one module:

* the telemetry daemon's **control socket** (``shoal telemetry ...``):
  ``status`` (:class:`Status`), ``label`` (:class:`Label`), ``train``
  (:class:`Train`), ``install`` (:class:`Install`, in chunks for a large model)
  and ``features`` (:class:`Features`);
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
    "Features",
    "MAX_MODEL_CHUNK",
    "MAX_INSTALL_BYTES",
    "MAX_FEATURES_PAGE",
    "Run",
]

#: Domain error codes of the two services (besides contract.ERROR_CODES).
ERROR_CODES = {
    "bad_label": "telemetry label: the label is not a short token of letters, digits, '-', '_', '.'",
    "train_failed": "telemetry train: too few training windows, or training failed",
    "model_refused": "telemetry install: the model is corrupt, lacks metadata or does not fit this node",
    "bad_upload": "telemetry install: a chunk for an unknown or expired upload, at the wrong offset, "
                  "or past the upload's size",
    "run_failed": "fedserver run: the federated run did not produce a model",
}

MAX_STATUS_WINDOWS = 1000  # recent windows one status reply lists (each a small map)
# `install` carries a model in chunks of at most MAX_MODEL_CHUNK bytes, each in one RPC frame
# (protocol.rpc.DEFAULT_MAX_FRAME, 1 MiB, holds one chunk and its msgpack envelope with room to
# spare), up to MAX_INSTALL_BYTES in all: the documented cap (docs/telemetry.md). The daemon holds
# an upload in memory until its last chunk; a 460-feature seed model is ~370 KB, one chunk.
MAX_MODEL_CHUNK = 512 << 10
MAX_INSTALL_BYTES = 64 << 20
MAX_MODEL_RPC_BYTES = MAX_MODEL_CHUNK  # the old name of the per-call bound
MAX_UPLOAD_ID = 64
# The user's file name, echoed in refusals (a path: PATH_MAX).
MAX_MODEL_NAME = 4096
# `features`: one reply lists at most this many names (a node with node_exporter may have
# ~4000; each name is well under 200 bytes, so a page stays far below the frame limit).
MAX_FEATURES_PAGE = 2000
MAX_FEATURE_PREFIX = 256
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
    """``install``: an ONNX model file with shoal metadata, whole or in chunks.

    A file of at most MAX_MODEL_CHUNK bytes goes in one call (``model`` alone).
    A larger one: the first call sends ``model`` = its first chunk and ``total``
    = its size, and the daemon answers ``{"upload": ID, "received": N}``; each
    further call sends ``upload`` = ID, ``offset`` = N and the next chunk; the
    call whose chunk completes the file installs it and answers as a one-call
    install does. ``name`` (the user's file) is what refusals name.
    """

    model: bytes = bounded(max_len=MAX_MODEL_CHUNK)
    total: int | None = bounded(None, min=1, max=MAX_INSTALL_BYTES)
    upload: str | None = bounded(None, max_len=MAX_UPLOAD_ID)
    offset: int = bounded(0, min=0, max=MAX_INSTALL_BYTES)
    name: str = bounded("", max_len=MAX_MODEL_NAME)

    def __post_init__(self) -> None:
        if self.upload is None and self.offset:
            raise BadParams("offset: only with upload (a chunk after the first)")
        if self.total is not None and len(self.model) > self.total:
            raise BadParams("model: the chunk is larger than total")


@dataclass(frozen=True, slots=True)
class Features(Contract):
    """``features``: the names of the node's window features (those a model may use), sorted,
    at most MAX_FEATURES_PAGE from ``offset``, only those starting with ``prefix``."""

    prefix: str = bounded("", max_len=MAX_FEATURE_PREFIX)
    offset: int = bounded(0, min=0, max=10_000_000)


# -- fedserver -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run(Contract):
    """``run``: one federated run of ``rounds`` rounds (None: the server's [federation] rounds)."""

    rounds: int | None = bounded(None, min=1, max=MAX_ROUNDS)
