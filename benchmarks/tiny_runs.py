"""The embedded PGPC run at test size (`configs/tiny.py` `embedded_run`) as a user runs it, and
what a finished run holds: shared by `kill_resume.py` and `two_processes.py`."""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """\
from configs import tiny


def get_config():
    return tiny.embedded_run(
        {data_dir!r}, {steps}, batch_size={batch_size}, num_devices={num_devices},
        eval_every_steps={eval_every},
    )
"""


def prepare(root: str, steps: int, batch_size: int = 2, num_devices: int = 1) -> str:
    """Build the tiny embedded dataset under `root` and write the config file; returns its path."""
    from data_pipelines import build

    data_dir = os.path.join(root, "data")
    if build.main(["--dataset", "synthetic_shift", "--config", "tiny", "--data_dir", data_dir]):
        raise SystemExit(2)
    path = os.path.join(root, f"config_b{batch_size}_d{num_devices}_s{steps}.py")
    with open(path, "w") as f:
        f.write(
            CONFIG.format(
                data_dir=data_dir,
                batch_size=batch_size,
                num_devices=num_devices,
                steps=steps,
                eval_every=max(1, steps // 2),
            )
        )
    return path


def command(config_file: str, workdir: str, *extra: str) -> list[str]:
    """`python -m pgpc_jax.main --config FILE --workdir DIR ...`."""
    cmd = [sys.executable, "-m", "pgpc_jax.main", "--config", config_file, "--workdir", workdir]
    return cmd + list(extra)


def env(devices: int = 1, cache_dir: str | None = None) -> dict:
    """CPU JAX with `devices` devices; a persistent compilation cache when `cache_dir`."""
    out = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    if cache_dir:
        out["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    else:
        out["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    return out


def finished_run(workdir: str):
    """What a run left: (state leaves as numpy, each process's data positions per iterator,
    {step: training metrics}, the logged training steps in order, the evaluation rows)."""
    import jax
    import numpy as np

    from pgpc_jax import weights

    _, state, step = weights.load_run(workdir)
    leaves = []
    for x in jax.tree.leaves(state):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        leaves.append(np.asarray(x))
    positions = {}
    for name in ("source", "target"):
        folder = os.path.join(workdir, "checkpoints", str(step), f"data_{name}")
        positions[name] = [
            open(os.path.join(folder, f)).read()
            for f in sorted(os.listdir(folder))
            if f.startswith("process_")
        ]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    logged = {r["step"]: {k: v for k, v in r.items() if k.startswith("train/")} for r in train_rows}
    evals = [{k: v for k, v in r.items() if k != "wall_time"} for r in rows if "eval/miou" in r]
    return leaves, positions, logged, [r["step"] for r in train_rows], evals
