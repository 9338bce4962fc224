"""SePiCo on the method seam (`pgpc_jax/methods/sepico.py`).

The run-level invariants (five steps with finite losses, one trace, resume = uninterrupted with the
statistics and the memory bank, sharded = single device) are in tests/methods_test.py, which runs
every method of `METHODS`. Here: the method's losses of one step, called directly on a tiny model
(one compile of the forwards, no gradient), and its pieces.

* The statistics after a step are `update_stats` of the teacher's projection of the weak source
  and its downscaled ground truth, recomputed outside the method.
* Before `sepico.start_step` both contrastive terms are 0 and the target forward is skipped;
  from it they are not 0.
* The target contrast ignores the pixels of zero pseudo weight.
* The class-balanced crop takes the box `best_offsets` picks among the drawn boxes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.labels import IGNORE_INDEX
from pgpc_jax import methods
from pgpc_jax.losses import sepico as sl
from pgpc_jax.methods import sepico
from pgpc_jax.methods.context import Context, Student, bind_teacher
from pgpc_jax.models import segmentor
from pgpc_jax.uda import class_balanced_crop as cbc
from pgpc_jax.uda import dacs, sepico_stats
from tests import method_runs

_cache = {}


def _setup():
    """The tiny sepico run (DistCL, start step 2), a 2-image source batch of 32x32 crops, a
    target twice as wide (so the class-balanced crop chooses among boxes), and the losses of one
    step jitted as a function of the step."""
    if not _cache:
        config = method_runs.run_config("sepico")
        config.sepico.variant = "dist"
        model = methods.build_model(config)
        variables = segmentor.init_variables(model, jax.random.key(0))
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        src, _ = method_runs.batches(1, batch=2)[0]
        rng = np.random.default_rng(1)
        tgt = {"image": rng.normal(size=(2, 32, 64, 3)).astype(np.float32)}
        state0 = methods.get("sepico").init_state(config, params)
        losses_of = methods.get("sepico").make_losses(config)

        @jax.jit
        def one_step(step, method_state):
            ctx = Context(
                src=src,
                tgt=tgt,
                step=step,
                # One key whatever the step: steps differ only by the start-step gate.
                rng=jax.random.key(3),
                method_state=method_state,
                student=Student(model, params, batch_stats),
                # At step 0 the teacher is a copy of the student.
                teacher=bind_teacher(model, params, batch_stats),
                imnet=None,
            )
            losses, new_state, metrics = losses_of(ctx)
            return losses, new_state, metrics, ctx.student.batch_stats

        _cache.update(
            config=config,
            model=model,
            params=params,
            batch_stats=batch_stats,
            src=src,
            state0=state0,
            one_step=one_step,
        )
    return _cache


def test_statistics_are_updated_from_the_teachers_projection_of_the_weak_source():
    run = _setup()
    _, stats, _, _ = run["one_step"](jnp.int32(0), run["state0"])
    teacher = bind_teacher(run["model"], run["params"], run["batch_stats"])
    proj = jax.jit(lambda x: teacher(x)[sepico.HEAD])(run["src"]["image"])
    feats, labels, valid = sl.prepare_contrast(
        proj, run["src"]["label"], num_classes=19, min_ratio=run["config"].sepico.min_ratio
    )
    want = sepico_stats.update_stats(run["state0"], feats, labels, valid)
    assert sorted(stats) == sorted(want) == ["count", "mean", "variance"]
    for key in want:
        np.testing.assert_allclose(stats[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # Something was counted: the source labels are whole 32x32 regions of one class each.
    assert float(stats["count"].sum()) == 2 * 8 * 8
    assert float(jnp.abs(stats["mean"]).sum()) > 0


def test_contrast_terms_start_at_start_step():
    run = _setup()
    start = run["config"].sepico.start_step
    assert start == 2
    before, _, metrics, bs_before = run["one_step"](jnp.int32(start - 1), run["state0"])
    after, _, _, bs_after = run["one_step"](jnp.int32(start), run["state0"])
    assert float(before["loss_contrast_src"]) == 0.0
    assert float(before["loss_contrast_tgt"]) == 0.0
    for losses in (before, after):
        assert all(np.isfinite(float(v)) for v in losses.values())
        assert float(losses["loss_src"]) > 0 and float(losses["loss_mix"]) > 0
    assert float(after["loss_contrast_src"]) != 0.0
    assert float(after["loss_contrast_tgt"]) != 0.0
    for key in ("loss_src", "loss_mix"):  # same keys: the gate changes nothing else
        assert float(after[key]) == float(before[key])
    assert float(metrics["pseudo_coverage"]) > 0  # some target pixels weigh, see below
    # The target forward, run from the start step only, changes the projection head's BatchNorm
    # statistics and leaves the decode head's as they were (the released target forward runs the
    # projection head alone).
    head_b, head_a = bs_before["auxiliary_head"], bs_after["auxiliary_head"]
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(head_a), jax.tree.leaves(head_b))
    )
    for a, b in zip(
        jax.tree.leaves(bs_after["decode_head"]), jax.tree.leaves(bs_before["decode_head"])
    ):
        np.testing.assert_array_equal(a, b)


def _settings(variant="dist"):
    config = method_runs.run_config("sepico")
    config.sepico.variant = variant
    return sepico._settings(config)


@pytest.mark.parametrize("variant", ["dist", "bank"])
def test_target_contrast_ignores_rows_of_zero_pseudo_weight(variant):
    """Embeddings of the zero-weight rows change nothing; the loss equals the one computed with
    those rows' labels set to the ignore index."""
    c = _settings(variant)
    rng = np.random.default_rng(0)
    dim, num_classes = 8, 19
    stats = sepico_stats.init_stats(num_classes, dim, 3 if variant == "bank" else 0)
    stats = sepico_stats.update_stats(
        stats,
        jnp.asarray(np.abs(rng.normal(size=(200, dim))), jnp.float32),
        jnp.asarray(rng.integers(0, num_classes, 200)),
        jnp.ones((200,), bool),
    )
    c = {**c, "channels": dim}
    labels = jnp.asarray(np.kron(rng.integers(0, 4, (2, 4, 4)), np.ones((1, 4, 4))), jnp.int32)
    weight = jnp.full(labels.shape, 0.6).at[:, :8].set(0.0)  # label rows 0-7: embedding rows 0-1
    proj = jnp.asarray(np.abs(rng.normal(size=(2, 4, 4, dim))), jnp.float32)
    proj = proj / jnp.linalg.norm(proj, axis=-1, keepdims=True)
    tgt = sepico.target_contrast_labels(labels, weight)
    assert int(jnp.sum(tgt == IGNORE_INDEX)) == 2 * 8 * 16
    loss = float(sepico.contrast(proj, tgt, stats, c))
    ignored = jnp.where(jnp.arange(16)[None, :, None] < 8, IGNORE_INDEX, labels)
    assert loss == float(sepico.contrast(proj, ignored, stats, c))
    moved_ignored = proj.at[:, :2].set(proj[:, ::-1][:, :2])
    assert float(sepico.contrast(moved_ignored, tgt, stats, c)) == pytest.approx(loss, abs=1e-7)
    moved_kept = proj.at[:, 2:].set(proj[:, :2])
    assert float(sepico.contrast(moved_kept, tgt, stats, c)) != pytest.approx(loss, abs=1e-7)


def _label_teacher(labels):
    """A teacher whose logits are 10 x one-hot of `labels` where the image's first channel is
    the label's pixel index (so a crop of the image gets the crop of the labels)."""
    flat = jnp.asarray(labels).reshape(-1)

    def teacher(images):
        index = jnp.round(images[..., 0]).astype(jnp.int32)
        return {"logits": 10.0 * jax.nn.one_hot(flat[index], 19)}

    return teacher


@pytest.mark.parametrize("regen", [True, False])
def test_class_balanced_crop_takes_the_box_best_offsets_picks(regen):
    config = method_runs.run_config("sepico")
    config.sepico.regen_pseudo = regen
    s, c = dacs.settings(config), sepico._settings(config)
    rng = np.random.default_rng(2)
    batch, height, width, crop = 3, 24, 40, (12, 16)
    labels = np.kron(rng.integers(0, 6, (batch, 6, 10)), np.ones((1, 4, 4))).astype(np.int32)
    labels[:, :, :8] = 0  # a region where one class fills the box: such boxes score 0
    index = np.arange(batch * height * width, dtype=np.float32).reshape(batch, height, width)
    images = jnp.asarray(np.stack([index, 0 * index, 0 * index], axis=-1))
    key = jax.random.key(5)
    out, pseudo, offsets = sepico.crop_target(_label_teacher(labels), images, crop, key, s, c)
    candidates = cbc.draw_offsets(key, batch, (height, width), crop, c["num_boxes"])
    scores = cbc.box_scores(candidates, jnp.asarray(labels), crop)
    assert len(np.unique(np.asarray(scores))) > 1  # the choice is not trivial
    want = cbc.best_offsets(candidates, jnp.asarray(labels), crop)
    np.testing.assert_array_equal(offsets, want)
    for b, (y, x) in enumerate(np.asarray(want)):
        np.testing.assert_array_equal(out[b], images[b, y : y + crop[0], x : x + crop[1]])
        np.testing.assert_array_equal(
            pseudo["label"][b], labels[b, y : y + crop[0], x : x + crop[1]]
        )
    # The uda.pseudo_ignore_* rows (2 and 4 in the tiny run) are those of the crop.
    weight = np.asarray(pseudo["weight"])
    assert weight.shape == (batch, *crop)
    assert (
        (weight[:, :2] == 0).all() and (weight[:, -4:] == 0).all() and (weight[:, 2:-4] > 0).all()
    )


def test_without_the_crop_the_target_must_have_the_source_size():
    config = method_runs.run_config("sepico")
    config.sepico.class_balanced_crop = False
    s, c = dacs.settings(config), sepico._settings(config)
    images = jnp.zeros((1, 8, 16, 3))
    with pytest.raises(ValueError, match="set data.target.crop_size to the source crop size"):
        sepico.crop_target(
            _label_teacher(np.zeros((1, 8, 16), np.int32)), images, (8, 8), None, s, c
        )


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("variant", "infonce", "sepico.variant='infonce': expected one of"),
        ("temperature", 0.0, "sepico.temperature=0.0: expected a positive number"),
        ("start_step", -1, "sepico.start_step=-1: expected an integer >= 0"),
    ],
)
def test_bad_settings_name_the_key(key, value, message):
    config = method_runs.run_config("sepico")
    config.sepico[key] = value
    with pytest.raises(ValueError, match=message):
        sepico.validate(config)
