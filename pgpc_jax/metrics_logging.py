"""Training metrics: a JSONL file, TensorBoard event files (without TensorFlow), a progress line.

`MetricsLogger(workdir, total_steps, start_step).log(step, metrics)` takes host floats (one
device fetch per log step in the trainer) and writes
  <workdir>/metrics.jsonl            one JSON object per call: {"step", "wall_time", <metrics>}
                                     (NaN / inf written as null, so every line is strict JSON)
  <workdir>/tensorboard/events.out.tfevents.<time>.<host>.<ns>   scalar summaries
and prints `step 1200/40000  loss 0.812  lr 5.8e-05  2.31 steps/s  ETA 4h40m`.

A resumed run starts at `start_step`: the records of later steps (written by the interrupted
run after its last checkpoint) are dropped from both files, so no step appears twice. Files are
written through `etils.epath` (a `gs://` workdir works) and replaced whole at each call (a new
file, then a rename): a run killed at any moment leaves complete files. Under several processes
only process 0 writes (`enabled=False` elsewhere).

The event file is TensorFlow's TFRecord framing (length, masked CRC32C, payload, masked CRC32C)
around hand-encoded `tensorflow.Event` protobufs holding `Summary.Value.simple_value` scalars,
the format of `tensorflow/core/util/events_writer.cc` and `tensorboardX.event_file_writer`:
TensorBoard reads it, and `read_events` here reads it back for tests.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import IO, Mapping

from etils import epath

# ------------------------------------------------------------------------------------------
# Event files.

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _CRC32C_POLY if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:  # wire type 2: length-delimited
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(
    wall_time: float, step: int, scalars: Mapping[str, float] | None = None, version: str = ""
) -> bytes:
    """A serialized `tensorflow.Event` (wall_time=1 double, step=2 int64, file_version=3,
    summary=5 with `Summary.value`=1: tag=1 string, simple_value=2 float)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if version:
        out += _field_bytes(3, version.encode())
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        out += _field_bytes(5, values)
    return out


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def event_header() -> bytes:
    """The first record of every event file: the file version."""
    return _record(encode_event(time.time(), 0, version="brain.Event:2"))


def scalars_record(step: int, values: Mapping[str, float], wall_time: float | None = None):
    """One framed event with a scalar per tag (non-finite values are written as they are)."""
    return _record(encode_event(time.time() if wall_time is None else wall_time, step, values))


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes):
    """Yield (field number, wire type, value) of a serialized protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_events(path: str | os.PathLike) -> list[dict]:
    """Read an event file back: [{'wall_time', 'step', 'file_version'?, 'scalars': {tag: v}}].

    Checks both CRCs of every record, so a test of this also checks the framing.
    """
    return [event for event, _ in _read_records(epath.Path(path).read_bytes(), str(path))]


def _read_records(data: bytes, path: str) -> list[tuple[dict, bytes]]:
    """[(event, its framed record bytes)] of an event file's contents."""
    events, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        if header_crc != _masked_crc(header) or payload_crc != _masked_crc(payload):
            raise ValueError(f"{path}: bad CRC in the record at byte {pos}")
        record = data[pos : pos + 16 + length]
        pos += 16 + length
        event = {"scalars": {}}
        for number, _, value in _fields(payload):
            if number == 1:
                event["wall_time"] = struct.unpack("<d", value)[0]
            elif number == 2:
                event["step"] = value - (1 << 64) if value >> 63 else value
            elif number == 3:
                event["file_version"] = value.decode()
            elif number == 5:
                for _, _, summary_value in _fields(value):
                    parts = {n: v for n, _, v in _fields(summary_value)}
                    tag = parts[1].decode()
                    event["scalars"][tag] = struct.unpack("<f", parts[2])[0]
        events.append((event, record))
    return events


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


def progress_line(
    step: int, total_steps: int, metrics: Mapping[str, float], steps_per_s: float | None
) -> str:
    """`step 1200/40000  loss 0.812  lr 5.8e-05  2.31 steps/s  ETA 4h40m`.

    Per-class IoUs (`eval/iou/...`) are left out (they are in the table and the files).
    """
    parts = [f"step {step}/{total_steps}"]
    for key, value in metrics.items():
        if not key.startswith("eval/iou/"):
            parts.append(f"{short_name(key)} {value:.3g}")
    if steps_per_s is not None and steps_per_s > 0:
        eta = (total_steps - step) / steps_per_s
        parts.append(f"{steps_per_s:.2f} steps/s  ETA {format_duration(eta)}")
    return "  ".join(parts)


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


def _replace(path: epath.Path, data: bytes) -> None:
    """Write `path` whole: a complete new file renamed over the old one."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    tmp.replace(path)


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
      event_path: path of this run's event file (it holds the kept events of earlier runs).
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
        logdir = workdir / "tensorboard"
        # TensorBoard's name pattern; the nanoseconds keep two runs of the same second apart.
        now = time.time_ns()
        name = f"events.out.tfevents.{now // 10**9:010d}.{socket.gethostname()}.{now % 10**9}"
        self.event_path = logdir / name
        self._lines: list[str] = []
        self._records: list[bytes] = [event_header()]
        if not enabled:
            return
        logdir.mkdir(parents=True, exist_ok=True)
        if self.jsonl_path.exists():
            for line in self.jsonl_path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= start_step:
                    self._lines.append(line)
        old_files = sorted(p for p in logdir.glob("events.out.tfevents.*") if p != self.event_path)
        for path in old_files:
            for event, record in _read_records(path.read_bytes(), str(path)):
                if "file_version" not in event and event["step"] <= start_step:
                    self._records.append(record)
        self._flush()
        for path in old_files:  # their kept events are in this run's file now
            path.unlink()

    def _flush(self) -> None:
        _replace(self.jsonl_path, "".join(line + "\n" for line in self._lines).encode())
        _replace(self.event_path, b"".join(self._records))

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
        self._records.append(scalars_record(int(step), values, now))
        self._flush()
        print(line, file=self._stream or sys.stdout, flush=True)
        return line

    def close(self) -> None:
        pass  # every call leaves complete files

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
