"""The whole run through `train_and_evaluate` on the tiny embedded dataset: 2 steps,
checkpoint, resume to 4 equals 4 uninterrupted steps exactly (state, data iterators, logs with no
step twice); a damaged latest checkpoint falls back to the previous one; a non-finite state is
never saved; a workdir of another model is refused before anything is written. Every run here
has the same 4-step config, so they share one compiled step."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tb_events
from tiny_run import build_tiny_data, final_state
from tiny_run import tiny_config as _config

from pgpc_jax import checkpointing, metrics_logging, prefetch, train
from pgpc_jax.config_checks import ConfigError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("data"))


class Preempted(Exception):
    pass


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """4 uninterrupted steps (checkpoints 2 and 4): (workdir, final state, data positions)."""
    workdir = str(tmp_path_factory.mktemp("straight") / "run")
    train.train_and_evaluate(_config(data_dir, 4), workdir)
    state, positions = final_state(workdir)
    return workdir, state, positions


def test_tensorboard_gets_the_evaluation_images_and_iou_table(straight_run):
    """The evaluation's colour predictions next to the labels, the teacher's pseudo-labels on
    the same images, and the per-class IoU table, as TensorBoard reads them."""
    board = tb_events.load(os.path.join(straight_run[0], "tensorboard"))
    tags = board.Tags()
    assert "eval/prediction_label/0" in tags["images"] and "eval/pseudo_label/0" in tags["images"]
    prediction = board.Images("eval/prediction_label/0")[-1]
    pseudo = board.Images("eval/pseudo_label/0")[-1]
    assert prediction.step == pseudo.step == 4
    assert prediction.width == 2 * pseudo.width and prediction.height == pseudo.height
    (table,) = board.Tensors("eval/iou_table/text_summary")
    assert b"| mIoU |" in table.tensor_proto.string_val[0]
    final = json.loads(open(os.path.join(straight_run[0], "final_metrics.json")).read())
    assert final["eval/miou"] == pytest.approx(board.Scalars("eval/miou")[-1].value)


def _assert_same_state(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _logged_steps(workdir):
    """Steps of the training records in metrics.jsonl and in TensorBoard (as it reads them)."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    jsonl = [r["step"] for r in rows if "train/loss" in r]
    scalars = tb_events.scalars(os.path.join(workdir, "tensorboard"))
    tensorboard = [step for step, _ in scalars["train/loss"]]
    return jsonl, tensorboard, rows


def test_resume_equals_uninterrupted(data_dir, straight_run, tmp_path, monkeypatch):
    straight, state_a, data_a = straight_run
    resumed = str(tmp_path / "resumed")

    # The interrupted run: the same 4-step config, killed after it logged steps 3 and 4 but
    # before its step-4 checkpoint was written; then the same command again resumes from 2.
    save = checkpointing.RunCheckpoints.save

    def die_before_step_4(self, step, state, iterators):
        if step == 4:
            self.close()  # step 2's write completes, as before a preemption signal's exit
            raise Preempted
        save(self, step, state, iterators)

    config = _config(data_dir, 4)
    monkeypatch.setattr(checkpointing.RunCheckpoints, "save", die_before_step_4)
    with pytest.raises(Preempted):
        train.train_and_evaluate(config, resumed)
    monkeypatch.setattr(checkpointing.RunCheckpoints, "save", save)
    metrics = train.train_and_evaluate(_config(data_dir, 4), resumed)
    assert "eval/miou" in metrics

    state_b, data_b = final_state(resumed)
    assert int(state_a.step) == int(state_b.step) == 4
    assert data_a == data_b and len(data_a["source"]) == 1
    _assert_same_state(state_a, state_b)
    assert bool(np.asarray(state_a.method_state["seen"]).any())

    # Logs: every step once, in both files, and the training metrics equal the straight run's.
    jsonl, tensorboard, rows_b = _logged_steps(resumed)
    assert jsonl == tensorboard == [1, 2, 3, 4]
    _, _, rows_a = _logged_steps(straight)
    loss_a = {r["step"]: r["train/loss"] for r in rows_a if "train/loss" in r}
    loss_b = {r["step"]: r["train/loss"] for r in rows_b if "train/loss" in r}
    assert loss_a == loss_b


def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    data_dir, straight_run, tmp_path, capsys
):
    source, state_a, _ = straight_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    # Truncate the array data of checkpoint 4 (a disk that filled up, a copy cut short).
    data_files = [
        os.path.join(d, f)
        for d, _, files in os.walk(os.path.join(workdir, "checkpoints", "4", "state"))
        for f in files
        if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep
    ]
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    train.train_and_evaluate(_config(data_dir, 4), workdir)
    out = capsys.readouterr().out
    assert "checkpoints/4 cannot be read" in out and "damaged-4" in out
    assert f"resumed from {os.path.realpath(workdir)} at step 2" in out
    # Nothing lost: the damaged checkpoint is kept aside; the run redid steps 3 and 4 exactly.
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "damaged-4"))
    state_b, _ = final_state(workdir)
    _assert_same_state(state_a, state_b)
    jsonl, tensorboard, _ = _logged_steps(workdir)
    assert jsonl == tensorboard == [1, 2, 3, 4]


def test_a_non_finite_state_is_never_saved(data_dir, tmp_path, monkeypatch):
    """NaN images at step 3, a checkpoint step between two log steps: the run stops there with
    a message naming the step and the terms, and the latest checkpoint is step 2's."""
    config = _config(data_dir, 4)
    config.checkpoint_every_steps = 1
    config.log_every_steps = 4
    real = prefetch.DevicePrefetcher
    made = []

    class Poisoning(real):
        """The loop wraps the source iterator first; its third batch gets NaN images."""

        def __init__(self, iterator, put, depth):
            made.append(self)
            is_source, count = len(made) == 1, [0]

            def poisoned(local):
                count[0] += 1
                if is_source and count[0] == 3:  # step 3's source batch
                    local = {**local, "image": np.full_like(local["image"], np.nan)}
                return put(local)

            super().__init__(iterator, poisoned, depth)

    monkeypatch.setattr(train.prefetch, "DevicePrefetcher", Poisoning)
    workdir = str(tmp_path / "run")
    with pytest.raises(metrics_logging.NonFiniteLossError) as err:
        train.train_and_evaluate(config, workdir)
    message = str(err.value)
    assert "step 3" in message and "train/loss=nan" in message
    assert "the latest checkpoint, step 2, is the last finite state" in message
    assert "\n" not in message
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
    state, _ = final_state(workdir)
    assert int(state.step) == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_another_model_in_the_workdir_is_refused_before_writing(data_dir, straight_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(straight_run[0], workdir)
    before = {
        os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
        for d, _, files in os.walk(workdir)
        for f in files
    }
    config = _config(data_dir, 4)
    config.model.head_embed_dim = 24
    with pytest.raises(ConfigError) as err:
        train.train_and_evaluate(config, workdir)
    message = str(err.value)
    assert "does not fit this config" in message
    assert "model.head_embed_dim (run 16, now 24)" in message
    after = {
        os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
        for d, _, files in os.walk(workdir)
        for f in files
    }
    assert after == before


def test_a_checkpoint_of_another_process_count_is_refused(data_dir, straight_run, tmp_path):
    """Data positions are per process: resuming 2 processes' checkpoint with 1 says so (and
    does not take the checkpoint for a damaged one)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(straight_run[0], workdir)
    for step in ("2", "4"):
        for name in ("data_source", "data_target"):
            folder = os.path.join(workdir, "checkpoints", step, name)
            os.rename(
                os.path.join(folder, "process_0-of-1.json"),
                os.path.join(folder, "process_0-of-2.json"),
            )
            shutil.copy(
                os.path.join(folder, "process_0-of-2.json"),
                os.path.join(folder, "process_1-of-2.json"),
            )
    with pytest.raises(
        checkpointing.CheckpointError, match="written by 2 process.es. and this run has 1"
    ):
        train.train_and_evaluate(_config(data_dir, 4), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_prefetching_changes_nothing_and_logs_the_input_wait(data_dir, straight_run, tmp_path):
    """The straight run read batches 2 ahead onto the device (the default); the same run reading
    each batch when the step needs it ends in the same state at the same data positions, and
    both log the host's input time per step."""
    straight, state_a, data_a = straight_run
    config = _config(data_dir, 4)
    assert config.data.prefetch == 2
    config.data.prefetch = 0
    workdir = str(tmp_path / "no_prefetch")
    train.train_and_evaluate(config, workdir)
    state_b, data_b = final_state(workdir)
    assert data_a == data_b
    _assert_same_state(state_a, state_b)
    for run in (straight, workdir):
        _, _, rows = _logged_steps(run)
        waits = [r["perf/data_wait_ms"] for r in rows if "perf/data_wait_ms" in r]
        # Logged from the second step on (the first also waits for the pipeline to start).
        assert len(waits) == 3 and all(w > 0 for w in waits)
