"""DHT node records: what a stranger may announce, and what readers accept."""

from __future__ import annotations

from typing import Any

import pytest

from proto.records import HardwareInfo, NodeRecord, RecordError


def _record(**overrides: Any) -> dict[str, Any]:
    record = NodeRecord(
        peer_id="QmPeer",
        address="127.0.0.1:31337",
        group="gpu-vllm",
        models=("tiny",),
        start_block=0,
        end_block=4,
        hardware=HardwareInfo(cpu_cores=2, weight_format="bf16"),
        methods=("continuous_batching", "dynamic_batching"),
    ).to_dict()
    record.update(overrides)
    return record


def test_a_record_with_methods_survives_the_round_trip() -> None:
    parsed = NodeRecord.from_dict(_record())
    assert parsed.methods == ("continuous_batching", "dynamic_batching")
    assert parsed.hardware.weight_format == "bf16"


def test_a_record_without_methods_announces_none_which_readers_take_as_every_method() -> None:
    raw = _record()
    del raw["methods"]
    assert NodeRecord.from_dict(raw).methods == ()


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (["warp_drive"], "unknown methods"),
        (["baseline", "baseline"], "repeats"),
        ("baseline", "list of method names"),
        ([1, 2], "list of method names"),
    ],
)
def test_a_bad_methods_field_rejects_the_record(methods: Any, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        NodeRecord.from_dict(_record(methods=methods))


@pytest.mark.parametrize(
    "overrides",
    [{"end_block": 0}, {"models": "tiny"}, {"load": float("nan")}, {"hardware": []}, {"address": "x" * 300}],
)
def test_other_malformed_fields_reject_the_record(overrides: dict[str, Any]) -> None:
    with pytest.raises(RecordError):
        NodeRecord.from_dict(_record(**overrides))
