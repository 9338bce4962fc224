"""The tiny training run the end-to-end tests share: the embedded PGPC config at test size."""

from __future__ import annotations

import json
import os

import jax

from configs import tiny
from data_pipelines import build
from pgpc_jax import weights


def tiny_config(data_dir: str, steps: int, batch_size: int = 2, num_devices: int = 1):
    """The embedded PGPC run at test size (`configs/tiny.py`), evaluated only at the end."""
    return tiny.embedded_run(data_dir, steps, batch_size, num_devices)


def build_tiny_data(data_dir: str) -> str:
    """The `tiny` build of the embedded dataset in `data_dir` (about a second)."""
    args = ["--dataset", "synthetic_shift", "--config", "tiny", "--data_dir", str(data_dir)]
    assert build.build(build.parse_args(args)) == 0
    return str(data_dir)


def final_state(workdir: str):
    """(the latest checkpoint's TrainState on the host, {iterator name: [each process's saved
    position]}), read in this process whatever process count wrote it."""
    _, state, step = weights.load_run(workdir)
    positions = {}
    for name in ("source", "target"):
        folder = os.path.join(workdir, "checkpoints", str(step), f"data_{name}")
        positions[name] = [
            json.load(open(os.path.join(folder, f)))
            for f in sorted(os.listdir(folder))
            if f.startswith("process_")
        ]
    return jax.device_get(state), positions
