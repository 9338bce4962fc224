"""`model.remat`: recomputing activations in the backward pass changes no gradient, no running
statistic and no parameter name. (Its memory saving shows only in an accelerator's compile:
XLA:CPU drops the barrier that keeps the recomputation apart and merges it back, so the CPU
memory analysis is the same with and without; `benchmarks/gpu_suite.sh` measures it.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from pgpc_jax.models.segmentor import build_segmentor, init_variables


def _model(remat):
    cfg = tiny.get_config().model
    cfg.remat = remat
    return build_segmentor(cfg)


def _loss_and_grads(model, variables, images):
    def loss(params):
        out, updated = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(7)},  # dropout and stochastic depth on
        )
        value = jnp.mean(out["logits"] ** 2) + sum(jnp.mean(f) for f in out["features"])
        return value, updated["batch_stats"]

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])


@pytest.fixture(scope="module")
def reference():
    images = jax.random.normal(jax.random.key(1), (2, 32, 48, 3))
    variables = init_variables(_model("none"), jax.random.key(0))
    return images, variables, _loss_and_grads(_model("none"), variables, images)


@pytest.mark.parametrize("remat", ["blocks", "all"])
def test_remat_gives_the_same_loss_gradients_and_statistics(reference, remat):
    images, variables, ((loss, stats), grads) = reference
    model = _model(remat)
    # The same variable tree: checkpoints and exports do not see the option.
    shapes = jax.tree.map(jnp.shape, init_variables(model, jax.random.key(0)))
    assert shapes == jax.tree.map(jnp.shape, variables)
    (loss_r, stats_r), grads_r = _loss_and_grads(model, variables, images)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((grads_r, stats_r)), jax.tree.leaves((grads, stats))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_an_unknown_remat_names_the_field():
    with pytest.raises(ValueError, match=r"model.remat='some'.*'none', 'blocks', 'all'"):
        _model("some")
