"""Tests for pgpc_jax.metrics_logging: JSONL, TensorBoard files (read back by TensorBoard), the
progress lines, the non-finite check, strict JSON, the compile-alarm filter."""

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tb_events
from PIL import Image

from pgpc_jax import metrics_logging as ml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_logger_writes_jsonl_tensorboard_and_progress(tmp_path):
    out = io.StringIO()
    image = np.zeros((6, 10, 3), np.uint8)
    image[:, :5] = (128, 64, 128)  # the road colour, left half
    with ml.MetricsLogger(str(tmp_path), total_steps=40000, stream=out) as logger:
        logger.log(1000, {"train/loss": 0.812, "train/lr": 5.8e-5, "train/loss_src": 0.3})
        logger.log(1200, {"train/loss": float("nan"), "train/lr": 5.7e-5})
        logger.log(1200, {"eval/miou": 0.5, "eval/iou/road": 0.9})
        logger.log_images(1200, {"eval/prediction_label/0": image})
        logger.log_text(1200, "eval/iou_table", "| class | IoU (%) |\n|---|---:|\n| road | 90.00 |")

    lines = open(tmp_path / "metrics.jsonl").read().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: NaN written as null
    assert [r["step"] for r in records] == [1000, 1200, 1200]
    assert records[0]["train/loss"] == 0.812 and records[0]["train/lr"] == 5.8e-5
    assert records[1]["train/loss"] is None
    expected = {"step": 1200, "wall_time": records[2]["wall_time"], "eval/miou": 0.5}
    assert records[2] == {**expected, "eval/iou/road": 0.9}
    assert records[0]["wall_time"] <= records[1]["wall_time"]

    # Read back as TensorBoard reads it.
    board = tb_events.load(tmp_path / "tensorboard")
    tags = board.Tags()
    assert set(tags["scalars"]) == {
        "train/loss", "train/lr", "train/loss_src", "eval/miou", "eval/iou/road"
    }  # fmt: skip
    loss = board.Scalars("train/loss")
    assert [e.step for e in loss] == [1000, 1200]
    assert loss[0].value == pytest.approx(0.812) and math.isnan(loss[1].value)
    assert board.Scalars("eval/miou")[0].value == pytest.approx(0.5)
    (event,) = board.Images("eval/prediction_label/0")
    assert (event.step, event.width, event.height) == (1200, 10, 6)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, image)
    (text,) = board.Tensors("eval/iou_table/text_summary")
    assert text.step == 1200 and b"| road | 90.00 |" in text.tensor_proto.string_val[0]

    printed = out.getvalue().splitlines()
    assert printed[0] == "step 1000/40000  loss 0.812  loss_src 0.3"  # no speed yet, no lr
    assert printed[1].startswith("step 1200/40000  loss nan  ")
    assert "steps/s  ETA " in printed[1]
    assert printed[2] == "step 1200/40000  eval/miou 0.5"  # same step: no speed; no per-class


def test_restart_drops_the_steps_after_the_resumed_one(tmp_path):
    """A run logged to step 6, resumed from its step-4 checkpoint: steps 5 and 6 are logged
    again by the resumed run and must not appear twice in the JSONL file nor in TensorBoard."""
    first = ml.MetricsLogger(str(tmp_path), total_steps=8, stream=io.StringIO())
    for step in (2, 4, 6):
        first.log(step, {"train/loss": float(step)})
    first.log(4, {"eval/miou": 0.25})
    first.close()
    resumed = ml.MetricsLogger(str(tmp_path), total_steps=8, stream=io.StringIO(), start_step=4)
    for step in (6, 8):
        resumed.log(step, {"train/loss": 10.0 + step})
    resumed.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r.get("train/loss")) for r in rows] == [
        (2, 2.0), (4, 4.0), (4, None), (6, 16.0), (8, 18.0)
    ]  # fmt: skip
    assert tb_events.scalars(tmp_path / "tensorboard")["train/loss"] == [
        (2, 2.0), (4, 4.0), (6, 16.0), (8, 18.0)
    ]  # fmt: skip
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_gs_style_workdir_gets_its_event_files_copied(tmp_path, monkeypatch):
    """A workdir that is not a local path: tensorboardX writes a local folder, and the files are
    copied to the workdir's tensorboard/ after each call (here a local path stands in, with the
    check for a remote path forced)."""
    monkeypatch.setattr(ml, "_is_local", lambda path: False)
    with ml.MetricsLogger(str(tmp_path), total_steps=4, stream=io.StringIO()) as logger:
        logger.log(2, {"train/loss": 1.5})
        copied = tb_events.scalars(tmp_path / "tensorboard")  # before close: already there
        staging = logger._staging
    assert copied == {"train/loss": [(2, 1.5)]}
    assert not os.path.exists(staging)


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
    metrics = {
        "train/loss": 0.812,
        "train/lr": 5.8e-5,
        "train/grad_norm": 3.0,
        "train/loss_mix": 0.5,
    }
    line = ml.progress_line(1200, 40000, metrics, 2.31)
    # 38800 steps / 2.31 steps/s = 16797 s = 4 h 39 min 57 s.
    assert line == "step 1200/40000  loss 0.812  loss_mix 0.5  2.31 steps/s  ETA 4h39m"


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


def test_progress_lines_with_rate_and_eta():
    out = io.StringIO()
    progress = ml.Progress("evaluating", 100, stream=out, every_s=0.0)
    progress._start -= 10.0  # ten seconds ago
    progress.update(40)
    progress.update(80)  # past the total (a padded last batch): counted up to it
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("evaluating 40/100 images  4.0 images/s  ETA 15s")
    assert lines[-1].startswith("evaluating 100/100 images")
    assert lines[-1].endswith("  in 10s") and "ETA" not in lines[-1]


def test_strict_json_has_no_bare_nan():
    text = ml.strict_json({"eval/miou": 0.5, "eval/iou/train": float("nan")})
    assert "NaN" not in text and json.loads(text) == {"eval/miou": 0.5, "eval/iou/train": None}


ALARM = [
    "E1207 04:36:08.1 123 slow_operation_alarm.cc:73] \n",
    "********************************\n",
    "[Compiling module jit_step] Very slow compile? If you want to file a bug, run with envvar "
    "XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.\n",
    "********************************\n",
]
FOLDING = [
    "E1207 04:36:09.2 123 slow_operation_alarm.cc:73] Constant folding an instruction is taking "
    "> 1s:\n",
    "\n",
    "  %reduce = f32[] reduce(...)\n",
    "\n",
    "This isn't necessarily a bug; constant-folding is inherently a trade-off.\n",
    "If you'd like to file a bug, run with envvar XLA_FLAGS=--xla_dump_to=/tmp/foo and attach "
    "the results.\n",
]


def test_compile_alarm_filter_drops_only_the_alarms():
    other = ["W1207 04:36:10.0 123 gloo.cc:12] a real warning\n", "Traceback (most recent call)\n"]
    lines = ["before\n", *ALARM, other[0], *FOLDING, other[1], "after\n"]
    assert list(ml.compile_alarm_filter(lines)) == ["before\n", other[0], other[1], "after\n"]


def test_without_compile_alarms_filters_file_descriptor_2(tmp_path):
    """Lines written to fd 2 (as XLA's C++ logging writes them) inside the block: the alarm is
    dropped, the rest comes through; outside the block, stderr is untouched."""
    script = tmp_path / "alarm.py"
    script.write_text(
        "import os\n"
        "from pgpc_jax import metrics_logging as ml\n"
        f"alarm = {''.join(ALARM)!r}\n"
        "with ml.without_compile_alarms():\n"
        "    os.write(2, b'kept inside\\n' + alarm.encode() + b'also kept\\n')\n"
        "os.write(2, alarm.encode())\n"
    )
    run = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        check=True,
    )
    assert run.stderr == "kept inside\nalso kept\n" + "".join(ALARM)
