"""bfloat16 compute keeps float32 state, for every method of `METHODS` (the other invariants are
in tests/methods_test.py; this file is separate so that the two test workers share the
compiling)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgpc_jax import methods
from pgpc_jax.train_step import make_train_step
from tests import method_runs


# SePiCo is left out to save a compile in CI: its state is float32 whatever the compute dtype
# (`uda/sepico_stats.py: update_stats` casts the embeddings to float32 and keeps the dtypes of
# `init_stats`), and its bfloat16 forwards are those of the heads tested here and in
# tests/projection_head_test.py.
@pytest.mark.parametrize("name", sorted(set(methods.METHODS) - {"sepico"}))
def test_bfloat16_compute_keeps_float32_state(name):
    """`model.dtype='bfloat16'`: the step runs in bf16; parameters, optimizer state, teacher and
    method state stay float32, and the first step's losses are close to the float32 step's (the
    recorded first step of the run)."""
    built = method_runs.build(name)
    config = built["config"]
    config.model.dtype = "bfloat16"
    model = methods.build_model(config)
    src, tgt = method_runs.batches(1)[0]
    new, m16 = jax.jit(make_train_step(config, model, built["optimizer"]))(built["state"], src, tgt)
    for leaf in jax.tree.leaves((new.params, new.opt_state, new.teacher_params, new.method_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    with open(method_runs.FIXTURE) as f:
        m32 = json.load(f)[name]["metrics"][0]
    for key in m32:
        if key.startswith("train/loss"):
            # atol: loss_fd, a distance of two nearly equal feature maps, is bf16 rounding noise.
            np.testing.assert_allclose(float(m16[key]), m32[key], rtol=0.05, atol=1e-3, err_msg=key)
