"""SePiCo's day-night variant (`sepico.day_night`, `configs/cs2darkzurich.py:sepico`).

On the tiny model with a synthetic batch of night images and their paired day images:

* the pseudo-labels are the argmax of `mix_day_night_probs` of the teacher's softmax on the day
  and on the night images (times the class weights), recomputed outside the method, and the
  quality weight is the share of mixed scores at or above the threshold;
* the class-balanced box is chosen on those labels and cuts the night and the day image alike;
  the teacher labels the two crops again (or, without `regen_pseudo`, the whole images' labels are
  cut);
* the source and the mixed cross-entropies weigh each pixel by its class weight.

The config end to end on the Dark Zurich fixture is in tests/real_configs_test.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cs2darkzurich
from data_pipelines import dark_zurich
from data_pipelines.labels import IGNORE_INDEX
from pgpc_jax import methods, train
from pgpc_jax.config_checks import ConfigError, check_config
from pgpc_jax.losses.segmentation import cross_entropy
from pgpc_jax.methods import sepico
from pgpc_jax.methods.context import Context, Student, bind_teacher
from pgpc_jax.models import segmentor
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.uda import class_balanced_crop as cbc
from pgpc_jax.uda import dacs, day_night
from tests import method_runs

CROP = (32, 32)
_cache = {}


def _config(regen=True):
    config = method_runs.run_config("sepico")
    config.sepico.variant = "dist"
    config.sepico.day_night = True
    config.sepico.regen_pseudo = regen
    config.data.target.paired_day = True
    return config


def _setup():
    """The tiny model, a night batch twice as wide as the crop and its (different) day batch."""
    if not _cache:
        config = _config()
        model = methods.build_model(config)
        variables = segmentor.init_variables(model, jax.random.key(0))
        rng = np.random.default_rng(4)
        night = rng.normal(size=(2, 32, 64, 3)).astype(np.float32)
        day = rng.normal(size=(2, 32, 64, 3)).astype(np.float32)
        _cache.update(
            config=config,
            model=model,
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            night=jnp.asarray(night),
            day=jnp.asarray(day),
        )
    return _cache


def _teacher(run):
    return bind_teacher(run["model"], run["params"], run["batch_stats"])


def _mixed_outside(run, night, day, strength=day_night.TRAIN_STRENGTH):
    """mix_day_night_probs of the teacher's two softmaxes, each forward run on its own batch."""
    teacher = _teacher(run)

    def softmax(x):
        return jax.nn.softmax(resize_bilinear(teacher(x)["logits"], x.shape[1:3]), axis=-1)

    p_day, p_night = softmax(day), softmax(night)
    weights = day_night.class_weights(strength=strength)
    return day_night.mix_day_night_probs(p_day, p_night, weights), p_night


@pytest.mark.parametrize("regen", [True, False])
def test_pseudo_labels_and_crop_come_from_the_mixed_day_night_scores(regen):
    run = _setup()
    config = _config(regen)
    # A threshold between the mixed scores' extremes: some pixels count as confident, not all.
    mixed, p_night = _mixed_outside(run, run["night"], run["day"])
    confidence = np.asarray(jnp.max(mixed, axis=-1))
    config.uda.pseudo_threshold = float(np.median(confidence))
    s, c = dacs.settings(config), sepico._settings(config)
    key = jax.random.key(7)
    night_crop, day_crop, pseudo, offsets = jax.jit(
        lambda n, d, k: sepico.crop_day_night_target(_teacher(run), n, d, CROP, k, s, c)
    )(run["night"], run["day"], key)

    full_label = jnp.argmax(mixed, axis=-1)
    # The mixed label is not the night prediction's: the day image changes the pseudo-labels.
    assert bool(jnp.any(full_label != jnp.argmax(p_night, axis=-1)))
    want_offsets = cbc.choose_crop(
        key, full_label.astype(jnp.int32), CROP, c["num_boxes"], 19, c["cat_max_ratio"]
    )
    np.testing.assert_array_equal(offsets, want_offsets)
    assert int(jnp.max(offsets[:, 1])) > 0  # a box away from the left edge: the test can fail
    for b, (y, x) in enumerate(np.asarray(offsets)):
        box = (slice(y, y + CROP[0]), slice(x, x + CROP[1]))
        np.testing.assert_array_equal(night_crop[b], run["night"][b][box])
        np.testing.assert_array_equal(day_crop[b], run["day"][b][box])

    if regen:  # the teacher labels the two crops again and mixes them again
        want, _ = _mixed_outside(run, night_crop, day_crop)
    else:  # the whole images' mixed scores, cut
        want = cbc.apply_crop(mixed, offsets, CROP)
        want_full_share = float(np.mean(confidence >= config.uda.pseudo_threshold))
    np.testing.assert_array_equal(pseudo["label"], jnp.argmax(want, axis=-1))
    np.testing.assert_allclose(pseudo["scores"], want, rtol=1e-5, atol=1e-7)
    # DACS's quality weight from the mixed score itself (the released `torch.max` of the mix),
    # one share for the batch, the uda.pseudo_ignore_* rows (2 and 4 here) of the crop zeroed.
    share = (
        float(np.mean(np.asarray(jnp.max(want, axis=-1)) >= config.uda.pseudo_threshold))
        if regen
        else want_full_share
    )
    assert 0.0 < share < 1.0
    weight = np.asarray(pseudo["weight"])
    np.testing.assert_allclose(weight[:, 2:-4], share, rtol=1e-6)
    assert (weight[:, :2] == 0).all() and (weight[:, -4:] == 0).all()


def test_source_and_mixed_cross_entropies_use_the_class_weights():
    """The step's `loss_src` and `loss_mix` equal the class-weighted cross-entropies recomputed
    outside from the same keys, and differ from the unweighted ones."""
    run = _setup()
    config = _config()
    s, c = dacs.settings(config), sepico._settings(config)
    rng = np.random.default_rng(5)
    src = {
        "image": jnp.asarray(rng.normal(size=(2, *CROP, 3)).astype(np.float32)),
        # Rare and frequent classes side by side, and ignored pixels.
        "label": jnp.asarray(
            np.kron(rng.choice([0, 2, 12, 17, IGNORE_INDEX], (2, 4, 4)), np.ones((1, 8, 8)))
        ).astype(jnp.int32),
    }
    tgt = {"image": run["night"], "day_image": run["day"]}
    rng_key = jax.random.key(11)
    model, params, batch_stats = run["model"], run["params"], run["batch_stats"]
    losses_of = methods.get("sepico").make_losses(config)

    @jax.jit
    def step_losses():
        ctx = Context(
            src=src,
            tgt=tgt,
            step=jnp.int32(0),
            rng=rng_key,
            method_state=methods.get("sepico").init_state(config, params),
            student=Student(model, params, batch_stats),
            teacher=_teacher(run),
            imnet=None,
        )
        return losses_of(ctx)[0]

    @jax.jit
    def outside():
        keys = dacs.split_keys(rng_key)
        mk = sepico.method_keys(keys)
        tgt_weak, _, pseudo, _ = sepico.crop_day_night_target(
            _teacher(run), run["night"], run["day"], CROP, mk["crop"], s, c
        )
        src_strong, _ = sepico.strong_source_target(keys, mk, src["image"], tgt_weak, s)
        student = Student(model, params, batch_stats)
        source = student(src_strong, keys.source)
        mix = dacs.class_mix(keys, src, tgt_weak, pseudo, s)
        mixed = student(mix["image"], keys.mix_dropout)
        w = day_night.class_weights()
        return dict(
            src=cross_entropy(source["logits"], src["label"]),
            src_weighted=cross_entropy(
                source["logits"],
                src["label"],
                day_night.pixel_class_weights(src["label"], w),
            ),
            mix=cross_entropy(mixed["logits"], mix["label"], mix["weight"]),
            mix_weighted=cross_entropy(
                mixed["logits"],
                mix["label"],
                mix["weight"] * day_night.pixel_class_weights(mix["label"], w),
            ),
        )

    losses, want = step_losses(), outside()
    assert float(losses["loss_src"]) == pytest.approx(float(want["src_weighted"]), rel=1e-5)
    assert float(losses["loss_mix"]) == pytest.approx(float(want["mix_weighted"]), rel=1e-5)
    assert float(want["src_weighted"]) != pytest.approx(float(want["src"]), rel=1e-4)
    assert float(want["mix_weighted"]) != pytest.approx(float(want["mix"]), rel=1e-4)


def test_decode_head_weights_are_the_class_weights_of_the_labels():
    c = sepico._settings(_config())
    labels = jnp.asarray([[[0, 12, IGNORE_INDEX]]], jnp.int32)
    w = np.asarray(day_night.class_weights(strength=0.05))
    got = sepico.decode_head_weights(labels, c, jnp.full((1, 1, 3), 0.5))
    np.testing.assert_allclose(got[0, 0], [0.5 * w[0], 0.5 * w[12], 0.5], rtol=1e-6)
    assert w[12] > 1.0 > w[0]  # rider is rare, road frequent
    plain = sepico._settings(method_runs.run_config("sepico"))
    assert sepico.decode_head_weights(labels, plain) is None


def test_cs2darkzurich_sepico_is_the_released_day_night_setting():
    config = cs2darkzurich.get_config("sepico")
    assert config.method == "sepico" and config.sepico.day_night
    assert config.data.target.paired_day and config.data.target.split == "train_night"
    assert (config.sepico.class_weight_strength, config.sepico.day_ratio) == (0.05, 0.8)
    assert (config.sepico.variant, config.sepico.regen_pseudo) == ("dist", True)
    assert (config.num_train_steps, config.seed, config.uda.fd_lambda) == (60_000, 42, 0.0)
    assert (config.uda.pseudo_ignore_top, config.uda.pseudo_ignore_bottom) == (0, 0)
    assert tuple(config.data.source.scale) == (1280, 640)
    assert tuple(config.data.source.crop_size) == (640, 640)
    assert tuple(config.data.target.scale) == tuple(config.data.val.scale) == (1280, 720)
    assert tuple(config.data.target.crop_size) == (720, 1280)
    config.init_from.path = ""  # the ImageNet file is not part of the repository
    check_config(config)  # valid as shipped
    # The other methods on the benchmark keep the plain target.
    assert not cs2darkzurich.get_config("daformer").data.target.paired_day


def _shipped_sepico():
    config = cs2darkzurich.get_config("sepico")
    config.init_from.path = ""
    return config


def test_paired_day_images_need_dark_zurich_night_and_the_variant_needs_them():
    config = _shipped_sepico()
    config.data.target.dataset = "cityscapes/daformer"
    config.data.target.split = "train"
    with pytest.raises(ConfigError, match="data.target.paired_day=True: only Dark Zurich's"):
        check_config(config)
    config = _shipped_sepico()
    config.data.target.paired_day = False
    with pytest.raises(
        ConfigError, match="sepico.day_night=True needs .* set data.target.paired_day=True"
    ):
        check_config(config)


def test_a_night_image_without_its_day_image_stops_with_the_config_key(monkeypatch):
    def unpaired(data_dir, dataset):
        raise dark_zurich.MissingCorrespondenceError("night image x_rgb_anon.png has no row")

    monkeypatch.setattr(dark_zurich, "open_day_night_pairs", unpaired)
    group = _shipped_sepico().data.target
    with pytest.raises(ConfigError, match="^data.target.paired_day=True: night image x_rgb"):
        train._open_day_night("data", group)
