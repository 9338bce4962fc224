"""Training metrics: a JSONL file, TensorBoard event files, a progress line; progress of long
loops (evaluation, prediction).

`MetricsLogger(workdir, total_steps, start_step).log(step, metrics)` takes host floats (one
device fetch per log step in the trainer) and writes
  <workdir>/metrics.jsonl            one JSON object per call: {"step", "wall_time", <metrics>}
                                     (NaN / inf written as null, so every line is strict JSON)
  <workdir>/tensorboard/events.out.tfevents.*   scalars; `log_images` and `log_text` add the
                                     evaluation's colour images and its per-class IoU table
and prints `step 1200/40000  loss 0.812  loss_src 0.31  loss_mix 0.50  2.31 steps/s  ETA 4h40m`
(the loss and its terms; every metric is in the files).

A resumed run starts at `start_step`: the JSONL records of later steps (written by the
interrupted run after its last checkpoint) are dropped, and the new event file starts with
TensorBoard's restart marker (`purge_step`), so TensorBoard drops the interrupted run's later
events: no step appears twice. The JSONL file is written through `etils.epath` and replaced
whole at each call (a new file, then a rename), so a run killed at any moment leaves a complete
file. Event files are written with tensorboardX; for a `gs://` workdir they are written to a
local folder and copied to the workdir after each call. Under several processes only process 0
writes (`enabled=False` elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import IO, Iterable, Iterator, Mapping

import numpy as np
from etils import epath
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2 as _event_pb2
from tensorboardX.proto import summary_pb2 as _summary_pb2

# ------------------------------------------------------------------------------------------
# Progress line and checks.


def format_duration(seconds: float) -> str:
    """45 -> '45s', 725 -> '12m05s', 16800 -> '4h40m', 183600 -> '2d03h'."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def short_name(key: str) -> str:
    """'train/loss' -> 'loss', 'train/lr' -> 'lr', 'eval/miou' -> 'eval/miou'."""
    return key[len("train/") :] if key.startswith("train/") else key


def _shown(key: str) -> bool:
    """The progress line's metrics: the loss and its terms, the evaluation's mIoU."""
    name = short_name(key)
    return name == "loss" or name.startswith("loss_") or key == "eval/miou"


def progress_line(
    step: int, total_steps: int, metrics: Mapping[str, float], steps_per_s: float | None
) -> str:
    """`step 1200/40000  loss 0.812  loss_src 0.31  2.31 steps/s  ETA 4h40m`.

    Only the loss, its terms (`loss_*`) and the evaluation's mIoU are shown; every metric is in
    the JSONL and TensorBoard files.
    """
    parts = [f"step {step}/{total_steps}"]
    for key, value in metrics.items():
        if _shown(key):
            parts.append(f"{short_name(key)} {value:.3g}")
    if steps_per_s is not None and steps_per_s > 0:
        eta = (total_steps - step) / steps_per_s
        parts.append(f"{steps_per_s:.2f} steps/s  ETA {format_duration(eta)}")
    return "  ".join(parts)


class Progress:
    """Progress of a long loop on one line: `evaluating 40/100 images  12.5 images/s  ETA 5s`.

    On a terminal the line is rewritten in place (at most every 0.5 s); in a log file a line is
    written every `every_s` seconds and at the end, so logs stay short.

    Args:
      label: what is done, e.g. 'evaluating'.
      total: the number of items (None: unknown, no ETA).
      unit: the items' name.
      stream: where to write (stderr).
      enabled: False writes nothing (processes other than 0).
      every_s: seconds between lines when the stream is not a terminal.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "images",
        stream: IO[str] | None = None,
        enabled: bool = True,
        every_s: float = 10.0,
    ):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.done = 0
        self._stream = stream or sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._every = 0.5 if self._tty else every_s
        self._start = self._last = time.time()

    def line(self, now: float | None = None, final: bool = False) -> str:
        elapsed = (time.time() if now is None else now) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        text = f"{self.label} {self.done}{of} {self.unit}  {rate:.1f} {self.unit}/s"
        if final:
            return f"{text}  in {format_duration(elapsed)}"
        if self.total and rate > 0:
            text += f"  ETA {format_duration(max(self.total - self.done, 0) / rate)}"
        return text

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.total:  # padding of the last batch
            self.done = min(self.done, self.total)
        now = time.time()
        if self.enabled and now - self._last >= self._every:
            self._last = now
            self._write(self.line(now))

    def close(self) -> None:
        """The final line (with the total time)."""
        if self.enabled:
            self._write(self.line(final=True), end="\n")

    def _write(self, text: str, end: str = "") -> None:
        if self._tty:
            self._stream.write(f"\r{text}\033[K{end}")
        else:
            self._stream.write(text + "\n")
        self._stream.flush()


def track(items: Iterable, progress: Progress | None, count=lambda item: 1) -> Iterator:
    """Yield `items`, counting each (by `count(item)`) on `progress` (None: no progress)."""
    for item in items:
        yield item
        if progress is not None:
            progress.update(count(item))
    if progress is not None:
        progress.close()


class NonFiniteLossError(FloatingPointError):
    """A loss (or other metric) or the model's parameters became NaN or infinite."""


def non_finite_message(
    metrics: Mapping[str, float], step: int, state_finite: bool = True, kept: int | None = None
) -> str | None:
    """None if every metric and the state are finite, else the one-line stop message.

    Args:
      metrics: host floats, e.g. {'train/loss': 0.8, 'train/loss_mix': nan}.
      step: the step they were computed at.
      state_finite: whether the parameters after the step are finite.
      kept: the latest checkpoint step (the last finite state), or None if there is none.
    """
    bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
    if not bad and state_finite:
        return None
    terms = ", ".join(f"{k}={v}" for k, v in bad.items())
    if not state_finite:
        terms = (terms + ", " if terms else "") + "non-finite parameters after the update"
    where = (
        f"the latest checkpoint, step {kept}, is the last finite state"
        if kept is not None
        else "no checkpoint was written"
    )
    return (
        f"non-finite values at step {step}: {terms}. Training stopped and nothing of step "
        f"{step} was saved; {where} (lower optimizer.learning_rate or check the data)."
    )


def _json_value(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def strict_json(values: Mapping[str, float], indent: int | None = None) -> str:
    """`values` as strict JSON: NaN and infinities become null (JSON has no NaN)."""
    return json.dumps(
        {k: _json_value(v) for k, v in values.items()}, indent=indent, allow_nan=False
    )


def _replace(path: epath.Path, data: bytes) -> None:
    """Write `path` whole: a complete new file renamed over the old one."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(path)


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


class MetricsLogger:
    """Writes metrics to `<workdir>/metrics.jsonl`, TensorBoard and stdout.

    Args:
      workdir: the run directory (local or `gs://`).
      total_steps: the run's length, for the ETA.
      start_step: the step the run (re)starts from; logged records of later steps are dropped.
      stream: where the progress line goes (stdout).
      enabled: False writes and prints nothing (processes other than 0).

    Attributes:
      jsonl_path: path of the JSONL file.
      logdir: the TensorBoard folder (`<workdir>/tensorboard`).
    """

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        stream: IO[str] | None = None,
        start_step: int = 0,
        enabled: bool = True,
    ):
        self.total_steps, self.enabled = total_steps, enabled
        self._stream = stream
        self._last: tuple[int, float] | None = None  # (step, time) of the previous log
        workdir = epath.Path(workdir)
        self.jsonl_path = workdir / "metrics.jsonl"
        self.logdir = workdir / "tensorboard"
        self._lines: list[str] = []
        self._events = self._staging = None
        if not enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        if self.jsonl_path.exists():
            for line in self.jsonl_path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= start_step:
                    self._lines.append(line)
        _replace(self.jsonl_path, "".join(line + "\n" for line in self._lines).encode())
        folder = os.fspath(self.logdir)
        if not _is_local(self.logdir):  # written locally, copied after each call
            folder = self._staging = tempfile.mkdtemp(prefix="pgpc_jax_tensorboard_")
        # Written synchronously (tensorboardX's SummaryWriter queues events for a thread): each
        # call leaves the events in the file. The suffix keeps two runs of one second apart.
        self._events = EventsWriter(
            os.path.join(folder, "events"), filename_suffix=f".{time.time_ns() % 10**9}"
        )
        if start_step:  # TensorBoard drops the earlier events of the steps after start_step
            self._write(start_step + 1, session_log=_event_pb2.SessionLog.START)
            self._flush()

    def _write(self, step: int, summary=None, session_log=None, wall_time=None) -> None:
        event = _event_pb2.Event(wall_time=time.time() if wall_time is None else wall_time)
        event.step = int(step)
        if summary is not None:
            event.summary.CopyFrom(summary)
        if session_log is not None:
            event.session_log.status = session_log
        self._events.write_event(event)

    def _flush(self) -> None:
        self._events.flush()
        if self._staging is not None:
            for name in os.listdir(self._staging):
                with open(os.path.join(self._staging, name), "rb") as f:
                    (self.logdir / name).write_bytes(f.read())

    def log(self, step: int, metrics: Mapping[str, float]) -> str:
        """Record `metrics` (host floats) at `step`; returns the progress line printed.

        The speed is measured between consecutive calls at different steps; a call at the same
        step as the previous one (e.g. evaluation metrics) restarts the clock, so evaluation
        time does not count as training time.
        """
        now = time.time()
        values = {k: float(v) for k, v in metrics.items()}
        rate = None
        if self._last is not None and step > self._last[0] and now > self._last[1]:
            rate = (step - self._last[0]) / (now - self._last[1])
        self._last = (int(step), now)
        line = progress_line(int(step), self.total_steps, values, rate)
        if not self.enabled:
            return line
        record = {"step": int(step), "wall_time": now}
        record.update({k: _json_value(v) for k, v in values.items()})
        self._lines.append(json.dumps(record, allow_nan=False))
        _replace(self.jsonl_path, "".join(line + "\n" for line in self._lines).encode())
        for key, value in values.items():
            # The Summary proto itself: tensorboardX's `scalar()` warns on NaN, which an
            # absent class's IoU is.
            summary = _summary_pb2.Summary(
                value=[_summary_pb2.Summary.Value(tag=key, simple_value=value)]
            )
            self._write(step, summary, wall_time=now)
        self._flush()
        print(line, file=self._stream or sys.stdout, flush=True)
        return line

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """TensorBoard images: {tag: uint8 [H, W, 3]}."""
        if self.enabled:
            for tag, image in images.items():
                image = np.asarray(image, np.uint8)
                self._write(step, tb_summary.image(tag, image, dataformats="HWC"))
            self._flush()

    def log_text(self, step: int, tag: str, text: str) -> None:
        """TensorBoard text (markdown, e.g. the per-class IoU table)."""
        if self.enabled:
            self._write(step, tb_summary.text(tag, text))
            self._flush()

    def close(self) -> None:
        if self._events is not None:
            self._flush()
            self._events.close()
            self._events = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# XLA's compile alarms.

# XLA's C++ logging writes a block like this to stderr when a compilation or a constant folding
# takes long:
#   E1207 04:36:08.1 123 slow_operation_alarm.cc:73]
#   ********************************
#   [Compiling module jit_step] Very slow compile? If you want to file a bug, run with envvar
#   XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.
#   ********************************
# Expected for this model on a CPU: the trainer says what it compiles and how long it took.
_ALARM_MARKERS = ("slow_operation_alarm", "Very slow compile?", "Constant folding an instruction")
_LOG_HEADER = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
_MAX_ALARM_LINES = 60


def compile_alarm_filter(lines: Iterable[str]) -> Iterator[str]:
    """The lines of `lines` that are not part of an XLA slow-operation alarm block."""
    state, kept_back = None, 0  # None, 'alarm' (inside a block) or 'tail' (after its text)
    for line in lines:
        if any(marker in line for marker in _ALARM_MARKERS):
            state, kept_back = ("tail" if "attach the results" in line else "alarm"), 0
            continue
        if state == "alarm":
            kept_back += 1
            if _LOG_HEADER.match(line) or kept_back > _MAX_ALARM_LINES:
                state = None  # another record: not part of the alarm
            else:
                if "attach the results" in line:
                    state = "tail"
                continue
        elif state == "tail":
            state = None
            if line.strip().startswith("*" * 8):
                continue
        yield line


@contextmanager
def without_compile_alarms(enabled: bool = True) -> Iterator[None]:
    """Drop XLA's slow-operation alarms from stderr while the block runs (a compile); every
    other line written to file descriptor 2 passes through unchanged."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "r", errors="replace", newline="") as pipe:
            for line in compile_alarm_filter(pipe):
                os.write(saved, line.encode())

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to the end
        thread.join(timeout=5)
        os.close(saved)
