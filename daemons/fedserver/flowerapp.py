"""The Flower app (ServerApp + ClientApp) that federates the telemetry autoencoders.

Theory of operation
-------------------
The fedserver daemon writes a tiny Flower app directory (a ``pyproject.toml``
and a two-line module that imports :data:`server_app` and :data:`client_app`
from here) and submits it to its SuperLink with ``flwr run``. The SuperLink
runs the ServerApp in a subprocess; each node's SuperNode runs the ClientApp
in a fresh short-lived process per message. Nothing here talks to the
telemetry daemon directly: data and models pass through files named in the
SuperNode's ``--node-config``, written atomically by whoever produces them.

* ``data``: ``train.npz`` written by the telemetry daemon: ``X`` (raw
  features of the node's training windows, float32) and ``features`` (their
  names). Raw data never leaves the node; only weights do.
* ``model-out``: ``global.npz`` written by the ClientApp at every evaluate
  message: the global weights, the feature names, the run id and round. The
  telemetry daemon watches it and installs the model (own scaler and own
  threshold, as in the seed).
* ``training-mark`` (optional): ``training.json``, written by the ClientApp just
  before and just after its local fit (``formats.encode_training_mark``). The fit
  takes the node's CPU for seconds; the telemetry daemon reads the mark when a
  window closes and does not score the windows it disturbed (``shoal-disturbed``).

One run (the ServerApp's ``main``):

1. **query**: ask every connected node (at least ``min-nodes``, waiting up to
   ``wait-nodes`` seconds) for its feature names and window count. Nodes
   differ (one has a GPU, another fewer disks); the federation uses the
   features that *every* answering node has, sorted.
2. **FedAvg** (``flwr.serverapp.strategy.FedAvg``) for ``rounds`` rounds from
   a fresh Autoencoder: each node min-max scales its own windows, trains
   ``epochs`` local epochs and answers with its weights and
   ``num-examples``; FedAvg averages them weighted by ``num-examples`` (the
   seed's formula). After each round an evaluate message carries the new
   global weights to every node, which stores them in ``model-out``.
3. The final global model is written to ``<out>/latest.npz`` (run id,
   features, weights, how many nodes took part) on the fedserver, which
   serves it over RPC to nodes that were down during the run (catch-up).

Flower's own grid waits 3 s between checks for the nodes' replies; the
ServerApp wraps it in :class:`QuickGrid`, which checks every
``REPLY_POLL`` seconds (one cheap request to the SuperLink), so a round is
not held up by up to 3 s three times over.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from shoal.core.telemetry.formats import (
    decode_model_npz,
    decode_training_npz,
    encode_model_npz,
    encode_training_mark,
)
from shoal.core.telemetry.model import Autoencoder, MinMaxScaler
from shoal.daemons.runtime.state import atomic_write

QUERY = "query"
REPLY_POLL = 0.5  # seconds between checks for replies (Flower's grid: 3 s)


# -- files shared with the daemons -------------------------------------------------
# The formats are shoal.core.telemetry.formats; here they are read and written.


def save_model_npz(path: Path, weights: list[np.ndarray], features: list[str], run_id: int, rnd: int,
                   nodes: int | None = None) -> None:
    data = encode_model_npz(weights, features, run_id, rnd, now=time.time(), nodes=nodes)
    atomic_write(Path(path), data, mode=0o644)


def load_model_npz(data: bytes | Path) -> tuple[list[np.ndarray], dict]:
    """-> (weights, meta) of a global model file (or its bytes); raises ValueError on anything malformed."""
    if isinstance(data, Path):
        try:
            data = data.read_bytes()
        except OSError as exc:
            raise ValueError(f"not a global model file: {exc}") from None
    return decode_model_npz(data)


def load_training_npz(path: Path) -> tuple[np.ndarray, list[str]]:
    return decode_training_npz(Path(path).read_bytes())


def _local_data(context: Context, features: list[str]) -> np.ndarray:
    X, names = load_training_npz(Path(str(context.node_config["data"])))
    index = {n: i for i, n in enumerate(names)}
    missing = [f for f in features if f not in index]
    if missing:
        raise ValueError(f"this node lacks {len(missing)} federated features, e.g. {missing[0]}")
    X = X[:, [index[f] for f in features]]
    return MinMaxScaler().fit(X).transform(X)


# -- ClientApp ---------------------------------------------------------------------

client_app = ClientApp()


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    try:
        X, names = load_training_npz(Path(str(context.node_config["data"])))
    except FileNotFoundError:  # the node has not closed a window yet
        X, names = np.zeros((0, 0), np.float32), []
    content = RecordDict({"info": ConfigRecord({"features": names, "windows": int(X.shape[0])})})
    return Message(content=content, reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg: Any = msg.content["config"]  # Flower's records are typed loosely: Any, checked by use
    features = [str(f) for f in cfg["features"]]
    X = _local_data(context, features)
    arrays: Any = msg.content["arrays"]
    ae = Autoencoder.from_weights(arrays.to_numpy_ndarrays())
    mark = context.node_config.get("training-mark")
    mark_path = Path(str(mark)) if mark else None
    start = time.time()
    if mark_path is not None:  # before the fit: the daemon sees it from the next window closing on
        atomic_write(mark_path, encode_training_mark(start, os.getpid()), mode=0o644)
    try:
        losses = ae.fit(X, epochs=int(cfg["epochs"]), batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]))
    finally:
        if mark_path is not None:
            atomic_write(mark_path, encode_training_mark(start, os.getpid(), end=time.time()), mode=0o644)
    content = RecordDict({
        "arrays": ArrayRecord(ae.get_weights()),
        "metrics": MetricRecord({"num-examples": int(X.shape[0]), "loss": float(losses[-1])}),
    })
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg: Any = msg.content["config"]  # Flower's records are typed loosely: Any, checked by use
    features = [str(f) for f in cfg["features"]]
    arrays: Any = msg.content["arrays"]
    weights = arrays.to_numpy_ndarrays()
    save_model_npz(Path(str(context.node_config["model-out"])), weights, features,
                   context.run_id, int(cfg["server-round"]))
    X = _local_data(context, features)
    err = Autoencoder.from_weights(weights).reconstruction_error(X)
    content = RecordDict({"metrics": MetricRecord({"num-examples": int(X.shape[0]), "loss": float(err.mean())})})
    return Message(content=content, reply_to=msg)


# -- ServerApp ---------------------------------------------------------------------


class QuickGrid(Grid):
    """Flower's grid, checking for replies every ``poll`` seconds instead of 3."""

    def __init__(self, grid: Grid, poll: float = REPLY_POLL) -> None:
        self._grid = grid
        self._poll = poll

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every message has its reply or ``timeout`` passes."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._poll)
        return replies


server_app = ServerApp()


def common_features(answers: list[list[str]]) -> list[str]:
    """The features every node has, sorted (the federation's input layer)."""
    if not answers:
        return []
    common = set(answers[0])
    for a in answers[1:]:
        common &= set(a)
    return sorted(common)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    grid = QuickGrid(grid)
    rc = context.run_config
    min_nodes = int(rc["min-nodes"])
    deadline = time.monotonic() + float(rc["wait-nodes"])
    while len(nodes := list(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} nodes connected, {min_nodes} needed")
        time.sleep(0.5)
    queries = [Message(content=RecordDict(), dst_node_id=n, message_type=QUERY) for n in nodes]
    replies = [r for r in grid.send_and_receive(queries, timeout=float(rc["timeout"])) if not r.has_error()]
    infos: list[Any] = [r.content["info"] for r in replies]
    answers = [[str(f) for f in info["features"]] for info in infos if int(info["windows"]) > 0]
    if len(answers) < min_nodes:
        raise RuntimeError(f"only {len(answers)} nodes have training windows, {min_nodes} needed")
    features = common_features(answers)
    if not features:
        raise RuntimeError("the nodes share no feature")
    ae = Autoencoder(len(features), seed=int(rc["seed"]))
    strategy = FedAvg(min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes)
    common: dict[str, Any] = {"features": features}
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(ae.get_weights()),
        num_rounds=int(rc["rounds"]),
        timeout=float(rc["timeout"]),
        train_config=ConfigRecord({**common, "epochs": int(rc["epochs"]), "lr": float(rc["lr"]),
                                   "batch-size": int(rc["batch-size"])}),
        evaluate_config=ConfigRecord(common),
    )
    save_model_npz(Path(str(rc["out"])) / "latest.npz", result.arrays.to_numpy_ndarrays(), features,
                   context.run_id, int(rc["rounds"]), nodes=len(answers))
