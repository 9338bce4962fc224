"""Model structure: parameter counts, shapes on odd sizes, BatchNorm modes, sharded BN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import base, tiny
from pgpc_jax.models.mit import MIT_VARIANTS
from pgpc_jax.models.segmentor import (
    abstract_variables,
    build_segmentor,
    count_params,
    init_variables,
    predict_logits,
)

# SegFormer paper, Table 1 (encoder parameters, millions), and DAFormer's 85.2 M for MiT-B5 +
# DAFormer head (3.7 M). B0 is checked against HF's exact count only.
PUBLISHED_ENCODER_M = {"b1": 13.1, "b2": 24.2, "b3": 44.0, "b4": 60.8, "b5": 81.4}


def _model_cfg(**overrides):
    cfg = base.get_model_config()
    cfg.update(overrides)
    return cfg


def _hf_encoder_params(variant: str) -> int:
    import torch
    from transformers import SegformerConfig, SegformerModel

    mit = MIT_VARIANTS[variant]
    config = SegformerConfig(
        hidden_sizes=list(mit.embed_dims),
        depths=list(mit.depths),
        num_attention_heads=list(mit.num_heads),
        sr_ratios=list(mit.sr_ratios),
    )
    with torch.device("meta"):
        model = SegformerModel(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_encoder_parameter_count(variant):
    abstract = abstract_variables(build_segmentor(_model_cfg(backbone=variant)))
    n = count_params(abstract["params"]["backbone"])
    assert n == _hf_encoder_params(variant)
    if variant in PUBLISHED_ENCODER_M:
        assert abs(n / 1e6 - PUBLISHED_ENCODER_M[variant]) < 0.1  # published to 0.1 M


def test_daformer_b5_parameter_count():
    abstract = abstract_variables(build_segmentor(_model_cfg()))
    head = count_params(abstract["params"]["decode_head"])
    total = count_params(abstract["params"])
    assert abs(head / 1e6 - 3.71) < 0.005
    assert abs(total / 1e6 - 85.2) < 0.05
    # BN running statistics are state, not parameters.
    assert "decode_head" in abstract["batch_stats"] and "backbone" not in abstract["batch_stats"]


@pytest.mark.parametrize("head", ["daformer", "segformer"])
def test_shapes_on_non_square_odd_input(head):
    model = build_segmentor(
        _model_cfg(backbone="tiny", head=head, head_embed_dim=32, head_channels=32)
    )
    variables = init_variables(model, jax.random.key(0))
    x = jnp.zeros((2, 75, 101, 3))
    outputs = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    logits, feats = outputs["logits"], outputs["features"]
    # Conv output sizes: floor((n + 2p - k) / s) + 1 for 7/4/3, then 3/2/1 three times.
    sizes = [(19, 26), (10, 13), (5, 7), (3, 4)]
    assert [f.shape[1:3] for f in feats] == sizes
    assert [f.shape[-1] for f in feats] == list(MIT_VARIANTS["tiny"].embed_dims)
    assert logits.shape == (2, 19, 26, 19) and logits.dtype == jnp.float32
    assert jax.eval_shape(lambda v: predict_logits(model, v, x), variables).shape == (
        2,
        75,
        101,
        19,
    )


def test_eval_uses_running_stats_and_train_uses_batch_stats():
    model = build_segmentor(tiny.get_config().model)
    variables = init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False)["logits"])
    train = jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
        )
    )
    # Eval: the output depends on the running statistics and not on the rest of the batch.
    a, b = evaluate(variables, x), evaluate(variables, x[:1])
    np.testing.assert_allclose(np.asarray(a[:1]), np.asarray(b), atol=1e-5)
    shifted = jax.tree.map(
        lambda v: v + 0.5 if v.dtype == jnp.float32 else v, variables["batch_stats"]
    )
    shifted_vars = {**variables, "batch_stats": shifted}
    assert not np.allclose(np.asarray(a), np.asarray(evaluate(shifted_vars, x)))
    # Train: batch statistics (running ones ignored), running estimates updated once.
    out, updated = train(variables, x)
    out2, _ = train(shifted_vars, x)
    t, t2 = out["logits"], out2["logits"]
    np.testing.assert_allclose(np.asarray(t), np.asarray(t2), atol=1e-5)
    counts = [int(v) for v in jax.tree.leaves(updated["batch_stats"]) if v.dtype == jnp.int32]
    assert counts and set(counts) == {1}


def test_sharded_batchnorm_uses_global_batch_statistics():
    """Under jit with the batch split over 8 devices, BN statistics are those of the global
    batch: outputs and updated running statistics equal the single-device computation."""
    assert jax.device_count() == 8
    cfg = tiny.get_config().model
    cfg.dropout_rate = 0.0
    cfg.drop_path_rate = 0.0
    model = build_segmentor(cfg)
    variables = init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 32, 48, 3)) * jnp.arange(1, 9)[:, None, None, None]

    def step(v, images):
        outputs, upd = model.apply(v, images, train=True, mutable=["batch_stats"])
        return outputs["logits"], upd["batch_stats"]

    ref_logits, ref_stats = jax.jit(step)(variables, x)
    mesh = jax.make_mesh((8,), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    logits, stats = jax.jit(
        step, out_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))
    )(variables, xs)
    assert len(xs.addressable_shards) == 8
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
