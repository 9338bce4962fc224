"""Tests for pgpc_jax.metrics_logging: JSONL, event files, progress line, non-finite check."""

import io
import json
import math
import os

import pytest

from pgpc_jax import metrics_logging as ml


def test_crc32c_known_value():
    # The CRC-32C check value (RFC 3720 / iSCSI test vector).
    assert ml.crc32c(b"123456789") == 0xE3069283
    assert ml.crc32c(b"") == 0


def test_logger_writes_jsonl_events_and_progress(tmp_path):
    out = io.StringIO()
    with ml.MetricsLogger(str(tmp_path), total_steps=40000, stream=out) as logger:
        logger.log(1000, {"train/loss": 0.812, "train/lr": 5.8e-5})
        logger.log(1200, {"train/loss": float("nan"), "train/lr": 5.7e-5})
        logger.log(1200, {"eval/miou": 0.5, "eval/iou/road": 0.9})

    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: NaN written as null
    assert [r["step"] for r in records] == [1000, 1200, 1200]
    assert records[0]["train/loss"] == 0.812 and records[0]["train/lr"] == 5.8e-5
    assert records[1]["train/loss"] is None
    expected = {"step": 1200, "wall_time": records[2]["wall_time"], "eval/miou": 0.5}
    assert records[2] == {**expected, "eval/iou/road": 0.9}
    assert records[0]["wall_time"] <= records[1]["wall_time"]

    event_dir = tmp_path / "tensorboard"
    (name,) = os.listdir(event_dir)
    assert name.startswith("events.out.tfevents.")
    events = ml.read_events(str(event_dir / name))
    assert events[0]["file_version"] == "brain.Event:2"
    assert [e["step"] for e in events[1:]] == [1000, 1200, 1200]
    assert events[1]["scalars"]["train/loss"] == pytest.approx(0.812)
    assert events[1]["scalars"]["train/lr"] == pytest.approx(5.8e-5)
    assert math.isnan(events[2]["scalars"]["train/loss"])
    assert events[3]["scalars"] == {"eval/miou": 0.5, "eval/iou/road": pytest.approx(0.9)}

    printed = out.getvalue().splitlines()
    assert printed[0] == "step 1000/40000  loss 0.812  lr 5.8e-05"  # no speed yet
    assert printed[1].startswith("step 1200/40000  loss nan  lr 5.7e-05  ")
    assert "steps/s  ETA " in printed[1]
    assert printed[2] == "step 1200/40000  eval/miou 0.5"  # same step: no speed; no per-class


def test_event_file_rejects_corruption(tmp_path):
    logger = ml.MetricsLogger(str(tmp_path), total_steps=10, stream=io.StringIO())
    logger.log(3, {"train/loss": 1.5})
    path = str(logger.event_path)
    data = bytearray(open(path, "rb").read())
    data[-6] ^= 0xFF  # inside the last payload
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="bad CRC"):
        ml.read_events(path)


def test_restart_drops_the_steps_after_the_resumed_one(tmp_path):
    """A run logged to step 6, resumed from its step-4 checkpoint: steps 5 and 6 are logged
    again by the resumed run and must not appear twice in either file."""
    first = ml.MetricsLogger(str(tmp_path), total_steps=8, stream=io.StringIO())
    for step in (2, 4, 4, 6):
        first.log(step, {"train/loss": float(step)})
    first.close()
    resumed = ml.MetricsLogger(str(tmp_path), total_steps=8, stream=io.StringIO(), start_step=4)
    for step in (6, 8):
        resumed.log(step, {"train/loss": 10.0 + step})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["train/loss"]) for r in rows] == [
        (2, 2.0), (4, 4.0), (4, 4.0), (6, 16.0), (8, 18.0)
    ]  # fmt: skip
    (name,) = os.listdir(tmp_path / "tensorboard")  # one event file holds the whole history
    events = ml.read_events(str(tmp_path / "tensorboard" / name))
    assert events[0]["file_version"] == "brain.Event:2"
    assert [(e["step"], e["scalars"]["train/loss"]) for e in events[1:]] == [
        (2, 2.0), (4, 4.0), (4, 4.0), (6, 16.0), (8, 18.0)
    ]  # fmt: skip
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_disabled_logger_writes_nothing(tmp_path):
    out = io.StringIO()
    logger = ml.MetricsLogger(str(tmp_path / "run"), total_steps=8, stream=out, enabled=False)
    assert logger.log(2, {"train/loss": 1.0}).startswith("step 2/8")
    assert not (tmp_path / "run").exists() and out.getvalue() == ""


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (45, "45s"), (725, "12m05s"), (16800, "4h40m"), (183600, "2d03h"), (math.inf, "?")],
)
def test_format_duration(seconds, text):
    assert ml.format_duration(seconds) == text


def test_progress_line_eta():
    line = ml.progress_line(1200, 40000, {"train/loss": 0.812, "train/lr": 5.8e-5}, 2.31)
    # 38800 steps / 2.31 steps/s = 16797 s = 4 h 39 min 57 s.
    assert line == "step 1200/40000  loss 0.812  lr 5.8e-05  2.31 steps/s  ETA 4h39m"


def test_non_finite_message_names_step_and_terms():
    assert ml.non_finite_message({"train/loss": 0.5, "train/lr": 6e-5}, 10) is None
    message = ml.non_finite_message(
        {"train/loss": float("nan"), "train/loss_src": 0.3, "train/loss_mix": float("inf")},
        1234,
        kept=1000,
    )
    assert "step 1234" in message
    assert "train/loss=nan" in message and "train/loss_mix=inf" in message
    assert "loss_src" not in message
    assert "the latest checkpoint, step 1000, is the last finite state" in message
    assert "non-finite parameters" in ml.non_finite_message({"train/loss": 0.5}, 7, False)
