"""The DAFormer train step: traces once, EMA teacher, frozen ImageNet encoder, sharded = single."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base, tiny
from pgpc_jax import optim, sharding
from pgpc_jax.models import segmentor
from pgpc_jax.train_state import create_train_state
from pgpc_jax.train_step import make_train_step


def _config(method="dacs"):
    config = base.get_config()
    config.model = tiny.get_config().model
    config.model.dropout_rate = 0.0  # identical randomness is not needed for these checks
    config.model.drop_path_rate = 0.0
    config.uda.method = method
    config.uda.pseudo_ignore_top = 2
    config.uda.pseudo_ignore_bottom = 4
    config.num_train_steps = 50
    config.optimizer.warmup_steps = 0  # visible parameter updates from step 0
    return config


def _batches(n, batch=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        src = {
            "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, 19, size=(batch, size, size)).astype(np.int32),
        }
        out.append((src, {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32)}))
    return out


@pytest.fixture(scope="module")
def setup():
    config = _config()
    model = segmentor.build_segmentor(config.model)
    tx = optim.make_optimizer(
        segmentor.abstract_variables(model)["params"], config.num_train_steps, **config.optimizer
    )
    variables = segmentor.init_variables(model, jax.random.key(0))
    traces = []

    def counted(state, src, tgt):
        traces.append(1)
        return make_train_step(config, model, tx)(state, src, tgt)

    return dict(
        config=config, model=model, tx=tx, variables=variables, step=jax.jit(counted), traces=traces
    )


def _fresh(setup):
    return create_train_state(setup["config"], setup["variables"], setup["tx"])


def test_step_traces_once_and_teacher_follows_the_ema_formula(setup):
    state = _fresh(setup)
    imnet = jax.device_get(state.imnet_params)
    students = [jax.device_get(state.params)]
    teachers = []
    for src, tgt in _batches(3):
        state, metrics = setup["step"](state, src, tgt)
        students.append(jax.device_get(state.params))
        teachers.append(jax.device_get(state.teacher_params))
    assert len(setup["traces"]) == 1
    assert int(state.step) == 3
    # Step 0 copies the student; step t mixes with alpha_t = min(1 - 1/(t+1), 0.999).
    leaf = lambda tree: tree["decode_head"]["conv_seg"]["kernel"]  # noqa: E731
    np.testing.assert_array_equal(leaf(teachers[0]), leaf(students[0]))
    for t in (1, 2):
        alpha = min(1 - 1 / (t + 1), 0.999)
        want = alpha * leaf(teachers[t - 1]) + (1 - alpha) * leaf(students[t])
        np.testing.assert_allclose(leaf(teachers[t]), want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(leaf(students[3]), leaf(students[0]))
    # No gradient reaches the frozen ImageNet encoder.
    for a, b in zip(jax.tree.leaves(imnet), jax.tree.leaves(jax.device_get(state.imnet_params))):
        np.testing.assert_array_equal(a, b)
    for key in (
        "train/loss_src",
        "train/loss_mix",
        "train/loss_fd",
        "train/pseudo_coverage",
        "train/learning_rate",
        "train/grad_norm",
    ):
        assert np.isfinite(float(metrics[key])), key


def test_sharded_step_equals_single_device(setup):
    src, tgt = _batches(1, seed=1)[0]
    single, m1 = setup["step"](_fresh(setup), src, tgt)
    mesh = sharding.make_mesh(8)
    data = NamedSharding(mesh, P("data"))
    state = jax.device_put(_fresh(setup), NamedSharding(mesh, P()))
    sharded, m8 = jax.jit(make_train_step(setup["config"], setup["model"], setup["tx"]))(
        state, jax.device_put(src, data), jax.device_put(tgt, data)
    )
    for key in m1:
        np.testing.assert_allclose(
            float(m8[key]), float(m1[key]), rtol=2e-4, atol=1e-6, err_msg=key
        )
    # Adam's first update is lr * g / (|g| + eps): where |g| is near eps, a different reduction
    # order moves it by up to ~lr. Everything else must agree to float tolerance.
    lr = setup["config"].optimizer.learning_rate
    diffs = np.concatenate(
        [
            np.abs(np.asarray(a) - np.asarray(b)).ravel()
            for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params))
        ]
    )
    assert diffs.max() <= 2 * lr
    assert np.mean(diffs > 1e-6) < 0.005


def test_source_only_trains_without_target_terms(setup):
    config = _config("source_only")
    step = jax.jit(make_train_step(config, setup["model"], setup["tx"]))
    src, tgt = _batches(1, seed=2)[0]
    state = _fresh(setup)
    new, metrics = step(state, src, tgt)
    assert "train/loss_mix" not in metrics and "train/pseudo_coverage" not in metrics
    assert np.isfinite(float(metrics["train/loss"]))
    np.testing.assert_array_equal(  # the teacher is untouched
        jax.device_get(new.teacher_params["decode_head"]["conv_seg"]["kernel"]),
        jax.device_get(state.teacher_params["decode_head"]["conv_seg"]["kernel"]),
    )


def _contrast_config(variant):
    config = _config()
    config.contrast.variant = variant
    config.contrast.grid = (5, 5)
    config.contrast.num_anchors = 32
    config.contrast.num_negatives = 64
    config.contrast.num_unreliable = 32
    config.contrast.reliable_threshold = 0.05  # the untrained teacher is unsure of everything
    return config


@pytest.mark.parametrize("variant", ["pgpc", "cluda"])
def test_contrast_step_touches_only_the_encoder(setup, variant):
    """The contrast is on encoder features: with it, the head's update is exactly DAFormer's,
    the encoder's is not, prototypes (pgpc) are kept in the state, and no parameter is added."""
    config = _contrast_config(variant)
    src, tgt = _batches(1, seed=3)[0]
    plain = jax.jit(make_train_step(_contrast_config("none"), setup["model"], setup["tx"]))
    with_cl = jax.jit(make_train_step(config, setup["model"], setup["tx"]))
    base_state, _ = plain(_fresh(setup), src, tgt)
    state = create_train_state(config, setup["variables"], setup["tx"])
    new, metrics = with_cl(state, src, tgt)
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
        seen = np.asarray(new.prototypes["seen"])
        assert seen.any() and not np.asarray(state.prototypes["seen"]).any()
        assert new.prototypes["mean"].shape == (19, 16 + 32 + 64 + 96)
    else:
        assert new.prototypes is None
        assert float(metrics["train/loss_contrast_src"]) > 0
        assert float(metrics["train/loss_contrast_mix"]) > 0


def test_pgpc_step_sharded_equals_single_device(setup):
    config = _contrast_config("pgpc")
    src, tgt = _batches(1, seed=4)[0]
    step = make_train_step(config, setup["model"], setup["tx"])
    state = create_train_state(config, setup["variables"], setup["tx"])
    single, m1 = jax.jit(step)(state, src, tgt)
    mesh = sharding.make_mesh(8)
    data = NamedSharding(mesh, P("data"))
    sharded, m8 = jax.jit(step)(
        jax.device_put(state, NamedSharding(mesh, P())),
        jax.device_put(src, data),
        jax.device_put(tgt, data),
    )
    for key in ("train/loss_contrast", "train/contrast/anchors", "train/contrast/negatives"):
        np.testing.assert_allclose(float(m8[key]), float(m1[key]), rtol=2e-4, err_msg=key)
    np.testing.assert_array_equal(
        np.asarray(sharded.prototypes["seen"]), np.asarray(single.prototypes["seen"])
    )
    np.testing.assert_allclose(
        np.asarray(sharded.prototypes["mean"]), np.asarray(single.prototypes["mean"]), atol=1e-5
    )


def test_contrast_needs_self_training():
    config = _contrast_config("pgpc")
    config.uda.method = "source_only"
    with pytest.raises(ValueError, match="contrast.variant='pgpc' needs uda.method='dacs'"):
        make_train_step(config, None, None)
    config = _contrast_config("infonce")
    with pytest.raises(ValueError, match="contrast.variant='infonce'"):
        make_train_step(config, None, None)


def test_bfloat16_compute_keeps_float32_parameters(setup):
    """`model.dtype='bfloat16'`: the PGPC step runs in bf16, parameters, optimizer state,
    teacher and prototypes stay float32, and the losses are close to the float32 step's."""
    src, tgt = _batches(1, seed=5)[0]
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = _contrast_config("pgpc")
        config.model.dtype = dtype
        model = segmentor.build_segmentor(config.model)
        state = create_train_state(config, setup["variables"], setup["tx"])
        results[dtype] = jax.jit(make_train_step(config, model, setup["tx"]))(state, src, tgt)
    new, m16 = results["bfloat16"]
    _, m32 = results["float32"]
    for tree in (new.params, new.opt_state, new.teacher_params, new.prototypes["mean"]):
        for leaf in jax.tree.leaves(tree):
            if jax.dtypes.issubdtype(leaf.dtype, np.floating):
                assert leaf.dtype == np.float32
    for key in ("train/loss_src", "train/loss_mix", "train/loss_contrast"):
        assert np.isfinite(float(m16[key])), key
        np.testing.assert_allclose(float(m16[key]), float(m32[key]), rtol=0.05, err_msg=key)


@pytest.mark.parametrize("overrides", [{"label_grid": "majority"}, {"positives": "pixel"}])
def test_contrast_options_trace(setup, overrides):
    """Every contrast option builds a step with the same state and metrics structure."""
    config = _contrast_config("pgpc")
    config.contrast.update(overrides)
    src, tgt = _batches(1, seed=6)[0]
    state = create_train_state(config, setup["variables"], setup["tx"])
    step = make_train_step(config, setup["model"], setup["tx"])
    new, metrics = jax.eval_shape(step, state, src, tgt)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert metrics["train/loss_contrast"].shape == ()
    config.contrast.label_grid = "bilinear"
    with pytest.raises(ValueError, match="contrast.label_grid='bilinear'"):
        make_train_step(config, setup["model"], setup["tx"])
