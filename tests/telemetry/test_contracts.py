"""The telemetry and fedserver RPC contracts (shoal.protocol.telemetry)."""

from __future__ import annotations

import pytest

from shoal.protocol.contract import BadParams
from shoal.protocol.telemetry import (
    MAX_MODEL_RPC_BYTES,
    MAX_ROUNDS,
    MAX_STATUS_WINDOWS,
    Install,
    Label,
    Run,
    Status,
    Train,
)


def test_defaults_and_round_trips():
    assert Status.decode(None).windows == 20
    assert Status.decode({}) == Status(20)
    assert Train.decode({}) == Train(None, None, None)
    assert Run.decode({}).rounds is None
    for c in (Status(3), Label(1.0, 2.0, "cpu-hog"), Label(0.0, 1.0), Train(5, 0.01, 8), Install(b"x"), Run(4)):
        assert type(c).decode(c.encode()) == c
    assert Label.decode({"start": 0, "end": 1}).start == 0.0  # an integer time is a number


@pytest.mark.parametrize("contract, raw, field", [
    (Status, {"windows": MAX_STATUS_WINDOWS + 1}, "windows"),
    (Status, {"windows": -1}, "windows"),
    (Status, {"windows": "3"}, "windows"),
    (Status, {"window": 3}, "window"),
    (Label, {"end": 1.0}, "start"),
    (Label, {"start": 0, "end": 1, "label": 7}, "label"),
    (Train, {"epochs": 0}, "epochs"),
    (Train, {"batch_size": 65537}, "batch_size"),
    (Train, {"lr": 0}, "lr"),
    (Train, {"lr": 1.5}, "lr"),
    (Install, {}, "model"),
    (Install, {"model": "not bytes"}, "model"),
    (Install, {"model": b"x" * (MAX_MODEL_RPC_BYTES + 1)}, "model"),
    (Run, {"rounds": MAX_ROUNDS + 1}, "rounds"),
    (Run, {"rounds": True}, "rounds"),
])
def test_bad_params_name_the_field(contract, raw, field):
    with pytest.raises(BadParams) as e:
        contract.decode(raw)
    assert field in str(e.value)
