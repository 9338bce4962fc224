"""Two processes x 4 CPU devices on localhost, as a TPU pod slice or a multi-node GPU job runs
(`launch/local_processes.sh 2`, which starts `python -m pgpc_jax.main --coordinator_address ...
--num_processes 2 --process_id i`), against
one process x 8 devices: the same losses step by step, the same final state and evaluation, each
process's data position saved as its own, one set of log files; and a checkpoint written by the
two processes resumes to the same state."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tb_events
from tiny_run import build_tiny_data, final_state, tiny_config

from pgpc_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH = 4, 8  # a global batch of 8: one image per device


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("data"))


def _config(data_dir):
    return tiny_config(data_dir, STEPS, batch_size=BATCH, num_devices=0)  # 0: every device


def _config_file(tmp_path, data_dir) -> str:
    """A config file for the subprocesses: the same config as `_config`."""
    path = tmp_path / "two_processes.py"
    path.write_text(
        "from configs import tiny\n\n\n"
        "def get_config():\n"
        f"    return tiny.embedded_run({data_dir!r}, {STEPS}, batch_size={BATCH}, num_devices=0)\n"
    )
    return str(path)


def _two_processes(config_file: str, workdir: str, log_dir) -> list[str]:
    """Run `launch/local_processes.sh 2` (2 processes of `python -m pgpc_jax.main` with 4 CPU
    devices each, as a user rehearses a multi-process run); returns the processes' outputs:
    process 0's is the script's stdout, process 1's its log file. The script also turns the
    persistent compilation cache off (its comment says why)."""
    result = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "launch", "local_processes.sh"),
            "2",
            "--devices_per_process",
            "4",
            "--log_dir",
            str(log_dir),
            "--",
            "--config",
            config_file,
            "--workdir",
            workdir,
        ],  # fmt: skip
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    log_1 = log_dir / "process_1.log"
    others = log_1.read_text() if log_1.exists() else ""
    assert result.returncode == 0, (
        f"processes failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}\n"
        f"process 1:\n{others[-3000:]}"
    )
    return [result.stdout, others]


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if "train/loss" in r}, rows


def _assert_close_states(a, b, exact: bool):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        if exact or not np.issubdtype(x.dtype, np.floating):
            np.testing.assert_array_equal(x, y)
        else:  # the cross-process sums may add in another order
            np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)


@pytest.mark.serial  # two processes of 4 devices each: alone on the CI machine's 2 cores
def test_two_processes_equal_one_and_resume(data_dir, tmp_path):
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    config_file = _config_file(tmp_path, data_dir)
    outputs = _two_processes(config_file, double, tmp_path / "logs_double")
    # Only process 0 reports (the progress lines and the evaluation table).
    assert "evaluation at step 4" in outputs[0] and "step 4/4" in outputs[0]
    assert "evaluation at step" not in outputs[1] and "step 4/4" not in outputs[1]

    train.train_and_evaluate(_config(data_dir), single)  # 1 process x the 8 test devices

    # Step by step the same losses: the global batches are the same on either topology.
    losses_1, _ = _losses(single)
    losses_2, rows_2 = _losses(double)
    assert sorted(losses_1) == sorted(losses_2) == [1, 2, 3, 4]
    for step in losses_1:
        for key, value in losses_1[step].items():
            if key.startswith("train/"):
                assert losses_2[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    evals = [r for r in rows_2 if "eval/miou" in r]
    assert len(evals) == 1 and evals[0]["step"] == 4

    state_1, positions_1 = final_state(single)
    state_2, positions_2 = final_state(double)
    _assert_close_states(state_1, state_2, exact=False)

    # One set of log files, written by process 0 alone.
    assert sorted(os.listdir(double)) == sorted(os.listdir(single))
    events_1 = os.listdir(os.path.join(single, "tensorboard"))
    assert len(os.listdir(os.path.join(double, "tensorboard"))) == len(events_1)
    scalars = tb_events.scalars(os.path.join(double, "tensorboard"))
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [losses_2[step]["train/loss"] for step in (1, 2, 3, 4)], rel=1e-6
    )
    # Each process saved its own data position.
    for name in ("source", "target"):
        saved = os.listdir(os.path.join(double, "checkpoints", "4", f"data_{name}"))
        saved = sorted(f for f in saved if f.endswith(".json"))
        assert saved == ["process_0-of-2.json", "process_1-of-2.json"]

    # Resume: the pair is killed after its step-2 checkpoint (checkpoint 4 never written, the
    # logs of steps 3 and 4 already there); the same command resumes to the same state.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(double, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    shutil.rmtree(os.path.join(resumed, "best"))
    outputs = _two_processes(config_file, resumed, tmp_path / "logs_resumed")
    assert "at step 2" in outputs[0]
    state_3, positions_3 = final_state(resumed)
    _assert_close_states(state_2, state_3, exact=True)
    assert positions_3 == positions_2
    losses_3, _ = _losses(resumed)
    assert sorted(losses_3) == [1, 2, 3, 4]
    assert {s: r["train/loss"] for s, r in losses_3.items()} == {
        s: r["train/loss"] for s, r in losses_2.items()
    }
    # TensorBoard shows each step once: the restart's steps replace the interrupted run's.
    resumed_scalars = tb_events.scalars(os.path.join(resumed, "tensorboard"))
    assert resumed_scalars["train/loss"] == scalars["train/loss"]
