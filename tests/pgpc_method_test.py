"""The PGPC method's own properties (the invariants every method shares are in
tests/methods_test.py): the contrast is on encoder features only, its state holds the class
prototypes, every option of the `pgpc` group traces, and bad values are named."""

import jax
import numpy as np
import pytest

from configs import base, tiny
from pgpc_jax import methods, optim
from pgpc_jax.models import segmentor
from pgpc_jax.train_state import create_train_state
from pgpc_jax.train_step import make_train_step


def _config(method="pgpc", variant="pgpc"):
    config = methods.configure(base.get_config(), method)
    config.model = tiny.get_config().model
    config.model.dropout_rate = 0.0  # identical randomness is not needed for these checks
    config.model.drop_path_rate = 0.0
    config.uda.pseudo_ignore_top = 2
    config.uda.pseudo_ignore_bottom = 4
    config.uda.target_weight = 1.0  # the same target loss as DAFormer's, to compare the head
    config.num_train_steps = 50
    config.optimizer.warmup_steps = 0  # visible parameter updates from step 0
    if method == "pgpc":
        config.pgpc.variant = variant
        config.pgpc.grid = (5, 5)
        config.pgpc.num_anchors = 32
        config.pgpc.num_negatives = 64
        config.pgpc.num_unreliable = 32
        config.pgpc.reliable_threshold = 0.05  # the untrained teacher is unsure of everything
    return config


def _batch(batch=8, size=32, seed=3):
    rng = np.random.default_rng(seed)
    src = {
        "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, 19, size=(batch, size, size)).astype(np.int32),
    }
    return src, {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32)}


@pytest.fixture(scope="module")
def setup():
    model = segmentor.build_segmentor(_config().model)
    variables = segmentor.init_variables(model, jax.random.key(0))
    optimizer = optim.make_optimizer(variables["params"], 50, **_config().optimizer)
    return dict(model=model, variables=variables, optimizer=optimizer)


def _state(setup, config):
    return create_train_state(config, setup["variables"], setup["optimizer"].tx)


@pytest.mark.parametrize("variant", ["pgpc", "cluda"])
def test_contrast_step_touches_only_the_encoder(setup, variant):
    """The contrast is on encoder features: with it, the head's update is exactly DAFormer's,
    the encoder's is not, prototypes (pgpc) are the method state, and no parameter is added."""
    config = _config(variant=variant)
    src, tgt = _batch()
    plain = _config("daformer")
    daformer_step = jax.jit(make_train_step(plain, setup["model"], setup["optimizer"]))
    base_state, _ = daformer_step(_state(setup, plain), src, tgt)
    state = _state(setup, config)
    new, metrics = jax.jit(make_train_step(config, setup["model"], setup["optimizer"]))(
        state, src, tgt
    )
    assert jax.tree.structure(new.params) == jax.tree.structure(base_state.params)
    for a, b in zip(
        jax.tree.leaves(new.params["decode_head"]),
        jax.tree.leaves(base_state.params["decode_head"]),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(new.params["backbone"]), jax.tree.leaves(base_state.params["backbone"])
        )
    ]
    assert any(moved)
    if variant == "pgpc":
        assert float(metrics["train/loss_contrast"]) > 0
        assert float(metrics["train/contrast/anchors"]) > 0
        seen = np.asarray(new.method_state["seen"])
        assert seen.any() and not np.asarray(state.method_state["seen"]).any()
        assert new.method_state["mean"].shape == (19, 16 + 32 + 64 + 96)
    else:
        assert new.method_state is None
        assert float(metrics["train/loss_contrast_src"]) > 0
        assert float(metrics["train/loss_contrast_mix"]) > 0


def test_bad_pgpc_values_are_named():
    config = _config(variant="infonce")
    with pytest.raises(ValueError, match="pgpc.variant='infonce': expected one of"):
        make_train_step(config, None, None)
    config = _config()
    config.pgpc.label_grid = "bilinear"
    with pytest.raises(ValueError, match="pgpc.label_grid='bilinear'"):
        make_train_step(config, None, None)


@pytest.mark.parametrize("overrides", [{"label_grid": "majority"}, {"positives": "pixel"}])
def test_pgpc_options_trace(setup, overrides):
    """Every option of the `pgpc` group builds a step with the same state and metrics."""
    config = _config()
    config.pgpc.update(overrides)
    src, tgt = _batch(seed=6)
    state = _state(setup, config)
    step = make_train_step(config, setup["model"], setup["optimizer"])
    new, metrics = jax.eval_shape(step, state, src, tgt)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert metrics["train/loss_contrast"].shape == ()
