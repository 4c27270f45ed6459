"""The protocol's typed requests: a round trip through a Flower record, and refusals by name."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from fedseg.protocol import (
    SHARE_STEP,
    FinetuneRequest,
    LatentRequest,
    ProtocolError,
    RoundRequest,
)


@pytest.mark.parametrize(
    "request_",
    [
        LatentRequest("test", 0, 16),
        RoundRequest(3, 10, 20, deadline_s=5.0),
        FinetuneRequest(2, 10, 3, grad_epoch=2, grad_step=2, next_step=4),
        FinetuneRequest(4, 10, SHARE_STEP, share_epoch=4, blind_epoch=3, blind_sites=["a", "b"]),
        FinetuneRequest(0, 10, 0, start=True),
    ],
)
def test_a_request_survives_a_flower_record(request_):
    record = ConfigRecord(request_.to_config())
    assert type(request_).from_config(dict(record)) == request_


def test_a_missing_or_mistyped_field_is_named():
    with pytest.raises(ProtocolError, match="LatentRequest: no 'stop'"):
        LatentRequest.from_config({"split": "train", "start": 0})
    with pytest.raises(ProtocolError, match=r"FinetuneRequest.step = 'x'"):
        FinetuneRequest.from_config({"epoch": 0, "epochs": 1, "step": "x"})
    with pytest.raises(ProtocolError, match="RoundRequest.start = 1.5: not an integer"):
        RoundRequest.from_config({"round": 1, "start": 1.5, "stop": 2})


def test_optional_fields_stay_out_of_the_record():
    values = FinetuneRequest(1, 2, 0).to_config()
    assert values == {"epoch": 1, "epochs": 2, "step": 0, "start": False}
