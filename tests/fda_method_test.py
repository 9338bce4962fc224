"""FDA on the method seam (`pgpc_jax/methods/fda.py`).

The run-level invariants (five steps, one trace, resume = uninterrupted, sharded = single device)
are in tests/methods_test.py, which runs every method of `METHODS`. Here: the losses of one step
called directly on a tiny model, against the same quantities computed outside the method from
the numpy transcription of the released transfer (`tests/numpy_fda.py`):

* the source loss is the cross-entropy of the student on the source styled by the target of the
  same batch position (raw pixels, the released numpy window);
* the entropy term is 0 before `fda.entropy_start_step` and weight x robust entropy of the
  student's target logits from it;
* `fda.self_training` adds the target's pseudo-label cross-entropy;
* `fda.with_dacs` is DAFormer's step on the styled source plus the entropy term;
* the recipes and the settings' errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gta2cs, synthetic
from pgpc_jax import methods
from pgpc_jax.losses.entropy import robust_entropy
from pgpc_jax.losses.segmentation import cross_entropy
from pgpc_jax.methods import fda
from pgpc_jax.methods.context import Context, Student, bind_teacher
from pgpc_jax.models import segmentor
from pgpc_jax.uda import dacs, mixing
from tests import method_runs
from tests import numpy_fda as ref

_cache = {}


def _config(**fda_settings):
    config = method_runs.run_config("fda")
    config.fda.beta = 0.1  # b = 3 on 32x32 crops: a window that changes the image
    config.fda.entropy_start_step = 2
    for key, value in fda_settings.items():
        config.fda[key] = value
    return config


def _setup():
    """A tiny model, a 2-image source batch and a labelled 2-image target batch of 32x32 images
    (noise in the normalised space, so raw pixels spread around the ImageNet mean)."""
    if not _cache:
        config = _config()
        model = methods.build_model(config)
        variables = segmentor.init_variables(model, jax.random.key(0))
        src, _ = method_runs.batches(1, batch=2)[0]
        rng = np.random.default_rng(1)
        tgt = {
            "image": rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 19, size=(2, 32, 32)).astype(np.int32),
        }
        tgt["label"][:, :8] = 255
        _cache.update(
            model=model,
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            src=src,
            tgt=tgt,
        )
    return _cache


def _losses(config, step):
    run = _setup()
    losses_of = methods.get("fda").make_losses(config)

    @jax.jit
    def one_step(step):
        ctx = Context(
            src=run["src"],
            tgt=run["tgt"],
            step=step,
            rng=jax.random.key(3),
            method_state=None,
            student=Student(run["model"], run["params"], run["batch_stats"]),
            teacher=bind_teacher(run["model"], run["params"], run["batch_stats"]),
            imnet=None,
        )
        return losses_of(ctx)

    losses, state, metrics = one_step(jnp.int32(step))
    assert state is None
    return jax.device_get(losses), jax.device_get(metrics)


def _styled_source_by_numpy(beta):
    """The source batch styled with the released numpy transfer, image by image on raw NCHW
    pixels, then normalised again."""
    run = _setup()
    raw = lambda x: np.asarray(mixing.denormalize(x)) * 255.0  # noqa: E731
    src, tgt = raw(run["src"]["image"]), raw(run["tgt"]["image"])
    out = np.stack(
        [
            ref.fda_source_to_target_np(
                s.transpose(2, 0, 1).astype(np.float64), t.transpose(2, 0, 1), beta
            ).transpose(1, 2, 0)
            for s, t in zip(src, tgt)
        ]
    )
    return np.asarray(mixing.renormalize(jnp.asarray(out / 255.0, jnp.float32)))


def _forward(images, key):
    run = _setup()
    student = Student(run["model"], run["params"], run["batch_stats"])
    return jax.jit(lambda x: student(x, key)["logits"])(images)


def test_source_loss_is_the_cross_entropy_of_the_source_styled_by_its_target():
    run = _setup()
    styled = _styled_source_by_numpy(0.1)
    assert np.abs(styled - run["src"]["image"]).max() > 0.1  # the window changes the image
    keys = dacs.split_keys(jax.random.key(3))
    want = cross_entropy(_forward(styled, keys.source), run["src"]["label"])
    losses, _ = _losses(_config(), 0)
    np.testing.assert_allclose(losses["loss_src"], want, rtol=2e-4)


def test_entropy_is_switched_on_at_its_start_step_with_its_weight():
    run = _setup()
    keys = dacs.split_keys(jax.random.key(3))
    entropy = robust_entropy(_forward(run["tgt"]["image"], keys.mix_dropout), 2.0)
    before, m0 = _losses(_config(), 1)
    after, m2 = _losses(_config(), 2)
    assert before["loss_ent"] == 0.0
    np.testing.assert_allclose(m0["entropy"], entropy, rtol=1e-5)
    np.testing.assert_allclose(after["loss_ent"], 0.005 * entropy, rtol=1e-5)
    assert sorted(after) == ["loss_ent", "loss_src"]


def test_self_training_adds_the_pseudo_label_cross_entropy():
    run = _setup()
    keys = dacs.split_keys(jax.random.key(3))
    logits = _forward(run["tgt"]["image"], keys.mix_dropout)
    losses, _ = _losses(_config(self_training=True, entropy_start_step=0), 0)
    np.testing.assert_allclose(losses["loss_tgt"], cross_entropy(logits, run["tgt"]["label"]), 1e-5)
    np.testing.assert_allclose(losses["loss_ent"], 0.005 * robust_entropy(logits), rtol=1e-5)


def test_with_dacs_is_daformers_step_on_the_styled_source_plus_the_entropy():
    run = _setup()
    config = _config(with_dacs=True)
    assert methods.get("fda").needs_teacher(config)
    losses, metrics = _losses(config, 2)
    assert sorted(losses) == ["loss_ent", "loss_mix", "loss_src"]
    assert {"pseudo_confidence", "entropy"} <= set(metrics)
    keys = dacs.split_keys(jax.random.key(3))
    styled = _styled_source_by_numpy(0.1)
    want = cross_entropy(_forward(styled, keys.source), run["src"]["label"])
    np.testing.assert_allclose(losses["loss_src"], want, rtol=2e-4)
    entropy = robust_entropy(_forward(run["tgt"]["image"], keys.method), 2.0)
    np.testing.assert_allclose(losses["loss_ent"], 0.005 * entropy, rtol=1e-5)


def test_styling_with_itself_keeps_the_image():
    x = np.random.default_rng(0).normal(size=(2, 16, 24, 3)).astype(np.float32)
    for window in fda.WINDOWS:
        np.testing.assert_allclose(fda.style_to(x, x, 0.1, window), x, atol=1e-4)


def test_the_recipes_and_the_configs():
    sst = synthetic.get_config("fda_sst")
    assert sst.method == "fda" and sst.fda.self_training and sst.fda.entropy_start_step == 0
    plain = gta2cs.get_config("fda")
    assert not plain.fda.self_training and plain.fda.beta == 0.01 and plain.uda.fd_lambda == 0
    assert not methods.get("fda").needs_teacher(plain)
    assert "fda_sst" in methods.names()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("fda.window", "box", "fda.window='box': expected one of"),
        ("fda.beta", 0.7, r"fda.beta=0.7: expected a value in \[0, 0.5\]"),
        ("fda.entropy_start_step", -1, "fda.entropy_start_step=-1"),
        ("fda.with_dacs", True, "choose one target loss"),
        ("data.target.crop_size", (32, 64), r"data.source.crop_size=\(512, 512\) but"),
    ],
)
def test_bad_settings_name_the_key(key, value, message):
    config = gta2cs.get_config("fda")
    config.fda.self_training = key == "fda.with_dacs"
    group, name = key.rsplit(".", 1)
    node = config
    for part in group.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(ValueError, match=message):
        fda.validate(config)


def test_contrast_is_the_paired_supcon_of_the_target_and_its_source_styled_version():
    """With as many samples as projection pixels the class-balanced sample takes every labelled
    pixel, so the term is the formula over all of them (tests/losses_supcon_test.py's numpy
    version), on the student's projections of the target and of the target styled by the source
    of its batch position (numpy transfer)."""
    from tests.losses_supcon_test import _numpy_supcon

    run = _setup()
    config = _config(contrast_weight=1.0, contrast_samples=64, contrast_channels=8)
    config.fda.contrast_temperature = 0.5
    model = methods.build_model(config)
    variables = segmentor.init_variables(model, jax.random.key(0))
    student = Student(model, variables["params"], variables.get("batch_stats", {}))
    losses_of = methods.get("fda").make_losses(config)
    keys = dacs.split_keys(jax.random.key(3))

    @jax.jit
    def step_and_views(styled):
        ctx = Context(
            src=run["src"],
            tgt=run["tgt"],
            step=jnp.int32(0),
            rng=jax.random.key(3),
            method_state=None,
            student=Student(model, variables["params"], variables.get("batch_stats", {})),
            teacher=None,
            imnet=None,
        )
        losses, _, metrics = losses_of(ctx)
        k_styled, _ = jax.random.split(keys.method)
        view_a = student(run["tgt"]["image"], keys.mix_dropout)[fda.HEAD]
        view_b = student.auxiliary(styled, k_styled)[fda.HEAD]
        return losses, metrics, view_a, view_b

    raw = lambda x: np.asarray(mixing.denormalize(x)) * 255.0  # noqa: E731
    styled = np.stack(
        [
            ref.fda_source_to_target_np(t.transpose(2, 0, 1), s.transpose(2, 0, 1), 0.1)
            for t, s in zip(raw(run["tgt"]["image"]), raw(run["src"]["image"]))
        ]
    ).transpose(0, 2, 3, 1)
    styled = mixing.renormalize(jnp.asarray(styled / 255.0, jnp.float32))
    losses, metrics, view_a, view_b = jax.device_get(step_and_views(styled))
    assert view_a.shape == (2, 8, 8, 8)
    labels = np.asarray(run["tgt"]["label"])[:, ::4, ::4].reshape(-1)
    valid = labels != 255
    want = _numpy_supcon(
        view_a.reshape(-1, 8).astype(np.float64),
        view_b.reshape(-1, 8).astype(np.float64),
        labels,
        valid,
        0.5,
        True,
    )
    np.testing.assert_allclose(losses["loss_contrast"], want, rtol=1e-4)
    np.testing.assert_allclose(metrics["contrast_samples"], valid.mean())
    assert sorted(losses) == ["loss_contrast", "loss_ent", "loss_src"]


def test_the_trainer_refuses_an_unlabelled_target_for_a_self_training_round():
    """`fda_sst` reads the target's labels: a split whose images carry none (all 255) stops the
    run with one line naming the dataset and the command that makes pseudo-labels."""
    from pgpc_jax import train
    from pgpc_jax.config_checks import ConfigError

    config = synthetic.get_config("fda_sst")
    assert methods.target_labels(config) and not methods.target_labels(synthetic.get_config("fda"))
    unlabelled = [{"label": np.full((4, 4), 255, np.uint8)}] * 3
    with pytest.raises(ConfigError, match="'folder/pseudo_labels' split='train': method 'fda'"):
        train._check_target_labels(unlabelled, config)
    train._check_target_labels([*unlabelled, {"label": np.zeros((4, 4), np.uint8)}], config)


def test_a_run_written_before_a_field_was_added_still_loads_with_its_default():
    """A run's config.json from before the contrast fields existed: `weights.load_run` completes
    the method's group with the defaults (contrast off), so its model rebuilds unchanged."""
    import json

    import ml_collections

    from pgpc_jax import weights

    config = gta2cs.get_config("fda")  # the group's defaults
    old = json.loads(config.to_json())
    for key in [k for k in old["fda"] if k.startswith("contrast_")]:
        del old["fda"][key]
    restored = weights.complete_method_group(ml_collections.ConfigDict(old))
    assert restored.fda.to_dict() == config.fda.to_dict()
    assert (
        methods.build_model(restored).auxiliary_heads == methods.build_model(config).auxiliary_heads
    )
