"""The whole run through `train_and_evaluate`: 2 steps, checkpoint, resume to 4 equals 4
uninterrupted steps exactly (state and data iterators), on the tiny embedded dataset."""

import json
import os

import jax
import numpy as np
import pytest

from configs import synthetic
from data_pipelines import build
from pgpc_jax import checkpointing, optim, train
from pgpc_jax.models import segmentor
from pgpc_jax.train_state import create_train_state


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    args = ["--dataset", "synthetic_shift", "--config", "tiny", "--data_dir", out]
    assert build.build(build.parse_args(args)) == 0
    return out


def _config(data_dir, steps):
    config = synthetic.get_config()  # PGPC: prototypes are part of the resumed state
    config.data.data_dir = data_dir
    for group in (config.data.source, config.data.target, config.data.val):
        group.dataset = "synthetic_shift/tiny"
    for group in (config.data.source, config.data.target):
        group.scale = ()
        group.crop_size = (32, 32)
        group.batch_size = 2
    config.data.val.scale = ()
    config.data.val.batch_size = 2
    config.data.source.rcs_min_pixels = 10
    config.contrast.grid = (5, 5)
    config.contrast.num_anchors = 16
    config.contrast.num_negatives = 32
    config.contrast.num_unreliable = 16
    config.model.head_embed_dim = config.model.head_channels = 16
    config.mesh.num_devices = 1
    config.num_train_steps = steps
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 1000  # only the final evaluation
    config.eval.num_visualizations = 1
    return config


def _final_state(config, workdir):
    model = segmentor.build_segmentor(config.model)
    abstract_vars = segmentor.abstract_variables(model)
    tx = optim.make_optimizer(abstract_vars["params"], config.num_train_steps, **config.optimizer)
    abstract = jax.eval_shape(lambda v: create_train_state(config, v, tx), abstract_vars)
    ckpts = checkpointing.RunCheckpoints(workdir, keep=2)
    state, data_state = ckpts.restore(abstract)
    ckpts.close()
    return jax.device_get(state), data_state


class Preempted(Exception):
    pass


def test_resume_equals_uninterrupted(data_dir, tmp_path, monkeypatch):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(_config(data_dir, 4), straight)

    # The interrupted run: the same 4-step config, killed right after its step-2 checkpoint
    # is written; then the same command again resumes.
    save = checkpointing.RunCheckpoints.save

    def save_then_die(self, step, state, data_state):
        save(self, step, state, data_state)
        if step == 2:
            self.close()  # the write completes, as it would before a preemption signal's exit
            raise Preempted

    monkeypatch.setattr(checkpointing.RunCheckpoints, "save", save_then_die)
    with pytest.raises(Preempted):
        train.train_and_evaluate(_config(data_dir, 4), resumed)
    monkeypatch.setattr(checkpointing.RunCheckpoints, "save", save)
    metrics = train.train_and_evaluate(_config(data_dir, 4), resumed)
    assert "eval/miou" in metrics

    a, data_a = _final_state(_config(data_dir, 4), straight)
    b, data_b = _final_state(_config(data_dir, 4), resumed)
    assert int(a.step) == int(b.step) == 4
    assert data_a == data_b
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert bool(np.asarray(a.prototypes["seen"]).any())

    # The logged training metrics of steps 3 and 4 agree too.
    def logged(workdir):
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        return {r["step"]: r for r in rows if "train/loss" in r and r["step"] > 2}

    la, lb = logged(straight), logged(resumed)
    assert sorted(la) == sorted(lb) == [3, 4]
    for step in la:
        assert la[step]["train/loss"] == lb[step]["train/loss"]
