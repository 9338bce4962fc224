"""Every method of `METHODS` on the method seam.

* No change in behaviour: five steps of source_only, daformer, pgpc and pgpc with the cluda loss
  give the numbers `tests/fixtures/method_runs.json` recorded before the seam existed
  (`python -m tests.method_runs --write`, run on the code of the commit before it).
* The invariants, for every method: the step traces once, the 8-device sharded step equals the
  single-device one, a resumed run equals the uninterrupted one bit for bit (bfloat16 compute
  keeping float32 state: tests/methods_bf16_test.py, a file of its own so that the two test
  workers share the compiling).
* A toy method defined in this file (a state, an auxiliary head, no teacher) trains through the
  unchanged `train_step.py`: the seam's proof.

One jitted step per run is shared by the tests (compiling dominates their time).
"""

import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pgpc_jax import checkpointing, methods, sharding
from pgpc_jax.losses.segmentation import cross_entropy
from pgpc_jax.train_step import make_train_step
from tests import method_runs

RUNS = method_runs.RUNS  # source_only, daformer, pgpc, pgpc_cluda
_built = {}


@pytest.fixture(autouse=True)
def _release_compiled_steps():
    """Every compiled step holds thousands of memory mappings (XLA:CPU code) and this file
    compiles two per method, more than a process may hold (vm.max_map_count) when all are kept
    to the end of the file: they are dropped after each test, and a later test that calls a
    run's step again reads it back from the persistent compilation cache."""
    yield
    jax.clear_caches()


def _run(name: str) -> dict:
    """Five single-device steps of run `name`, once per test session: the built run, its
    summary, the state after each step and how often the step was traced."""
    if name not in _built:
        built = method_runs.build(name)
        traces = []

        def counted(state, src, tgt):
            traces.append(1)
            return built["step_fn"](state, src, tgt)

        step = jax.jit(counted)
        states, metrics, state = {0: built["state"]}, [], built["state"]
        for src, tgt in method_runs.batches():
            state, m = step(state, src, tgt)
            metrics.append({k: float(v) for k, v in sorted(jax.device_get(m).items())})
            states[int(state.step)] = state
        built.update(
            step=step,
            states=states,
            summary=method_runs.summary(metrics, state),
            traces=len(traces),
        )
        _built[name] = built
    return _built[name]


def test_every_method_has_a_run():
    ran = {name.split("_cluda")[0] for name in RUNS}
    assert {methods.RECIPES.get(name, (name,))[0] for name in ran} == set(methods.METHODS)


@pytest.mark.parametrize("name", RUNS)
def test_same_numbers_as_before_the_method_seam(name):
    """Bit-identical on the machine that recorded the fixture. On another CPU, XLA vectorises
    reductions differently: two of our machines differed by up to 1.3e-5 relative (in
    loss_fd, a mean over few pixels) on the same code, hence the tolerance."""
    with open(method_runs.FIXTURE) as f:
        want = json.load(f)[name]
    got = _run(name)["summary"]
    assert len(got["metrics"]) == len(want["metrics"]) == method_runs.STEPS
    for step, (g, w) in enumerate(zip(got["metrics"], want["metrics"])):
        assert sorted(g) == sorted(w), step
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=1e-7, err_msg=(step, key))
    assert sorted(got["params"]) == sorted(want["params"])
    for key in want["params"]:
        np.testing.assert_allclose(
            got["params"][key], want["params"][key], rtol=1e-4, atol=1e-5, err_msg=key
        )


@pytest.mark.parametrize("name", RUNS)
def test_step_traces_once_and_keeps_only_what_the_method_needs(name):
    run = _run(name)
    method = methods.get(run["config"].method)
    assert run["traces"] == 1
    final = run["states"][method_runs.STEPS]
    assert int(final.step) == method_runs.STEPS
    assert (final.teacher_params is None) == (not method.needs_teacher(run["config"]))
    assert (final.imnet_params is None) == (not method.needs_imnet(run["config"]))
    for metrics in run["summary"]["metrics"]:
        assert all(np.isfinite(v) for v in metrics.values())


def test_teacher_follows_the_ema_formula_and_the_imagenet_encoder_stays_frozen():
    """DAFormer's teacher: a copy of the student at step 0, then alpha_t = min(1 - 1/(t+1),
    alpha) mixing with the student after step t-1's update; no gradient reaches the frozen
    ImageNet encoder (the daformer run has the feature distance on)."""
    run = _run("daformer")
    states, alpha = run["states"], run["config"].uda.ema_alpha
    leaf = lambda tree: np.asarray(tree["decode_head"]["conv_seg"]["kernel"])  # noqa: E731
    np.testing.assert_array_equal(leaf(states[1].teacher_params), leaf(states[0].params))
    for t in (1, 2, 3):
        a = min(1 - 1 / (t + 1), alpha)
        want = a * leaf(states[t].teacher_params) + (1 - a) * leaf(states[t].params)
        np.testing.assert_allclose(leaf(states[t + 1].teacher_params), want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(leaf(states[5].params), leaf(states[0].params))
    assert "train/loss_fd" in run["summary"]["metrics"][0]
    for a, b in zip(
        jax.tree.leaves(states[0].imnet_params), jax.tree.leaves(states[5].imnet_params)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _compare_states(a, b, exact: bool):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = (
            np.asarray(jax.random.key_data(x) if _is_key(x) else x),
            np.asarray(jax.random.key_data(y) if _is_key(y) else y),
        )
        if exact or not np.issubdtype(x.dtype, np.floating):
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def _uncommitted(x):
    if _is_key(x):
        return jax.random.wrap_key_data(
            np.asarray(jax.random.key_data(x)), impl=jax.random.key_impl(x)
        )
    return np.asarray(x)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


# cluda shares pgpc's code path; fda_supcon adds the contrast's per-image sampling to fda's.
@pytest.mark.parametrize("name", [*sorted(methods.METHODS), "fda_supcon"])
def test_sharded_step_equals_single_device(name):
    """Two steps on 8 devices (batch 8 split over them, state replicated) give the single-device
    metrics to float tolerance; parameters to within Adam's first-step sensitivity (where |g| is
    near eps a different reduction order moves lr * g / (|g| + eps) by up to ~lr)."""
    run = _run(name)
    mesh = sharding.make_mesh(8)
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    step = jax.jit(run["step_fn"])
    state = jax.device_put(run["states"][0], replicated)
    for i, (src, tgt) in enumerate(method_runs.batches(2)):
        state, m8 = step(state, jax.device_put(src, data), jax.device_put(tgt, data))
        m1 = run["summary"]["metrics"][i]
        for key, value in m1.items():
            np.testing.assert_allclose(float(m8[key]), value, rtol=2e-4, atol=1e-6, err_msg=key)
    # The head's rate (10x) of step 1, for each of the two steps.
    lr = float(run["optimizer"].learning_rate(1)) * run["config"].optimizer.head_lr_mult
    diffs = np.concatenate(
        [
            np.abs(np.asarray(a) - np.asarray(b)).ravel()
            for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(run["states"][2].params))
        ]
    )
    assert diffs.max() <= 4 * lr
    assert np.mean(diffs > 1e-6) < 0.005
    _compare_states(state.method_state, run["states"][2].method_state, exact=False)


@pytest.mark.parametrize("name", RUNS)
def test_resume_equals_uninterrupted(name, tmp_path):
    """The state after step 2, saved and restored by the run's checkpoint manager, continues to
    the same state at step 5 as the uninterrupted run, bit for bit (method state included)."""
    run = _run(name)
    ckpts = checkpointing.RunCheckpoints(tmp_path / "run")
    try:
        ckpts.save(2, run["states"][2], {})
        ckpts.latest.wait_until_finished()
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            run["states"][0],
        )
        state, step = ckpts.restore(abstract, {})
    finally:
        ckpts.close()
    assert step == 2
    # Restored arrays are committed to their device, the step's outputs are not: back through
    # the host, so that the shared jitted step is not compiled again for committed inputs.
    state = jax.tree.map(_uncommitted, state)
    for src, tgt in method_runs.batches()[2:]:
        state, _ = run["step"](state, src, tgt)
    _compare_states(state, run["states"][method_runs.STEPS], exact=True)


# --- The toy method: defined here, registered in METHODS, trained by the generic step. ---


class _ToyHead(nn.Module):
    """A 1x1 projection of the last encoder stage (an auxiliary head)."""

    @nn.compact
    def __call__(self, features, train):
        return nn.Conv(4, (1, 1), name="proj")(features[-1])


def _toy_losses_of(config):
    weight = float(config.toy.weight)

    def losses(ctx):
        out = ctx.student(ctx.src["image"], ctx.rng)
        proj = out["proj"]
        state = ctx.method_state
        # A method state that follows the batches: a count and a running mean of the projection.
        new_state = {
            "count": state["count"] + 1,
            "mean": 0.5 * state["mean"] + 0.5 * jax.lax.stop_gradient(proj.mean((0, 1, 2))),
        }
        return (
            {
                "loss_src": cross_entropy(out["logits"], ctx.src["label"]),
                "loss_toy": weight * jnp.mean(jnp.square(proj - state["mean"])),
            },
            new_state,
            {"toy/count": new_state["count"].astype(jnp.float32)},
        )

    return losses


TOY = types.SimpleNamespace(
    configure=lambda config: setattr(config, "toy", ml_collections.ConfigDict({"weight": 0.5})),
    validate=lambda config: None,
    needs_teacher=lambda config: False,
    needs_imnet=lambda config: False,
    auxiliary_heads=lambda config: {"proj": _ToyHead()},
    init_state=lambda config, params: {"count": jnp.zeros((), jnp.int32), "mean": jnp.zeros(4)},
    make_losses=_toy_losses_of,
)


def test_a_toy_method_plugs_in_without_touching_the_step(monkeypatch):
    from configs import base, tiny
    from pgpc_jax.models import segmentor
    from pgpc_jax.train_state import create_train_state

    monkeypatch.setitem(methods.METHODS, "toy", TOY)
    config = methods.configure(base.get_config(), "toy")
    config.model = tiny.get_config().model
    config.model.head_embed_dim = config.model.head_channels = 16
    config.optimizer.warmup_steps = 0
    model = methods.build_model(config)
    variables = segmentor.init_variables(model, jax.random.key(0))
    assert "proj" in variables["params"]["auxiliary_head"]
    optimizer = methods.make_optimizer(config, variables["params"])
    state = create_train_state(config, variables, optimizer.tx)
    assert state.teacher_params is None and state.imnet_params is None
    step = jax.jit(make_train_step(config, model, optimizer))
    first = state
    for src, tgt in method_runs.batches(2):
        state, metrics = step(state, src, tgt)
    assert int(state.method_state["count"]) == 2 and float(metrics["train/toy/count"]) == 2
    assert float(metrics["train/loss_toy"]) > 0
    assert np.abs(np.asarray(state.method_state["mean"])).sum() > 0
    # The auxiliary head trains with the head rule (10x lr): Adam's first steps move each of its
    # weights by about 10x what they move an encoder weight.
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a - b)).max()), state.params, first.params
    )
    head = moved["auxiliary_head"]["proj"]["proj"]["kernel"]
    encoder = max(jax.tree.leaves(moved["backbone"]))
    assert 5 * encoder < head < 20 * encoder
