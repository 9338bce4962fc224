"""PGPC: DAFormer self-training plus a pixel contrast on the encoder features (PGPC's released
`dacs.py`, and this project's reconstruction of the paper's loss; specification:
`docs/pgpc_spec.md`).

The step is DAFormer's (`uda/dacs.py`) with the pseudo-label weight times lambda_t
(`uda.target_weight` = 0.8, set by `configure`) and one more loss. The four encoder stages of the
source and mixed forwards are fused at stride 4 and sampled on a `pgpc.grid` (65x65 for 512 crops,
align_corners=True); labels go to the grid by PyTorch's legacy nearest rule (or by majority).

* `pgpc.variant='cluda'`: the released lineage's loss on the source grid (ground truth) plus the
  mixed grid (mixed labels, bilinear pixel weights), weight 1 each.
* `pgpc.variant='pgpc'` (default): the reconstruction (`docs/pgpc_spec.md`): one pixel set of the
  source and mixed grids of the global batch, each pixel with its label, confidence (1 for
  source and pasted pixels, the teacher's max probability for target ones, taken at the label's
  pixel) and the teacher's top-K classes; the class prototypes are the method state. No
  parameter is added.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from pgpc_jax.losses import contrast as cl
from pgpc_jax.uda import dacs, teacher

VARIANTS = ("pgpc", "cluda")


def config_group() -> ml_collections.ConfigDict:
    """The `pgpc` group. [released] = PGPC's released training step / the CLUDA loss it calls;
    [reconstructed] = this project's completion of the paper (`docs/pgpc_spec.md` lists each
    field; `docs/method.md` says why)."""
    return ml_collections.ConfigDict(
        dict(
            # 'pgpc' (reconstructed PGPC) or 'cluda' (the released loss).
            variant="pgpc",
            # Loss weight and first step [released: 1.0 from step 0].
            weight=1.0,
            start_step=0,
            # Grid the fused encoder features are sampled on [released: 65x65 for 512 crops].
            grid=(65, 65),
            # Labels to the grid: 'nearest' (one pixel per cell, PyTorch's legacy rule, released)
            # or 'majority' (the most frequent label of the cell's pixels; other per-pixel facts
            # stay nearest-sampled).
            label_grid="nearest",
            # cluda: reproduce the reference's feature/label flattening mismatch for B > 1.
            cluda_order_quirk=False,
            # pgpc [reconstructed]:
            temperature=0.1,
            reliable_threshold=0.968,
            prototype_momentum=0.99,
            num_anchors=1024,
            num_negatives=2048,
            num_unreliable=1024,
            # An unreliable target pixel is a negative for the classes outside its teacher top-K.
            unreliable_topk=3,
            unreliable_negatives=True,
            # Source pixels (source images, pasted source) as anchors, besides target pixels.
            source_anchors=True,
            # 'prototype' (pixel-to-prototype pull) or 'pixel' (same-class pixels).
            positives="prototype",
        )
    )


def configure(config) -> None:
    """PGPC as released on a DAFormer config: the `pgpc` group and lambda_t = 0.8 (the released
    60k steps are set by the benchmark configs)."""
    config.pgpc = config_group()
    config.uda.target_weight = 0.8


def validate(config) -> None:
    _settings(config)


def needs_teacher(config) -> bool:
    return True


def needs_imnet(config) -> bool:
    return dacs.needs_imnet(config)


def auxiliary_heads(config) -> dict:
    return {}


def init_state(config, params):
    """Empty class prototypes (one per class, the width of the fused encoder stages) for
    `variant='pgpc'`; None for 'cluda'."""
    if config.pgpc.variant != "pgpc":
        return None
    stages = [k for k in params["backbone"] if k.startswith("norm")]
    dim = sum(params["backbone"][k]["scale"].shape[0] for k in stages)
    return cl.init_prototypes(config.model.num_classes, dim)


def _settings(config) -> dict:
    """The `pgpc` group as plain Python values, validated."""
    c = config.pgpc
    if c.variant not in VARIANTS:
        raise ValueError(f"pgpc.variant={c.variant!r}: expected one of {VARIANTS}")
    if c.label_grid not in ("nearest", "majority"):
        raise ValueError(f"pgpc.label_grid={c.label_grid!r}: expected 'nearest' or 'majority'")
    if c.positives not in ("prototype", "pixel"):
        raise ValueError(f"pgpc.positives={c.positives!r}: expected 'prototype' or 'pixel'")
    return dict(
        variant=c.variant,
        weight=float(c.weight),
        start_step=int(c.start_step),
        grid=tuple(int(g) for g in c.grid),
        quirk=bool(c.cluda_order_quirk),
        label_grid=str(c.label_grid),
        topk=int(c.unreliable_topk),
        loss=dict(
            num_classes=int(config.model.num_classes),
            temperature=float(c.temperature),
            reliable_threshold=float(c.reliable_threshold),
            prototype_momentum=float(c.prototype_momentum),
            num_anchors=int(c.num_anchors),
            num_negatives=int(c.num_negatives),
            num_unreliable=int(c.num_unreliable),
            source_anchors=bool(c.source_anchors),
            positives=str(c.positives),
            unreliable_negatives=bool(c.unreliable_negatives),
        ),
    )


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(-1, *x.shape[3:])


def make_losses(config):
    s, c = dacs.settings(config), _settings(config)
    grid, topk = c["grid"], c["topk"]
    if c["label_grid"] == "majority":

        def labels_to_grid(labels, grid):
            return cl.majority_labels_to_grid(labels, grid, num_classes=s["num_classes"])
    else:
        labels_to_grid = cl.labels_to_grid

    def losses(ctx):
        keys = dacs.split_keys(ctx.rng)
        out = dacs.self_training(ctx, s, keys)
        losses, metrics = out["losses"], out["metrics"]
        mix, method_state = out["mix"], ctx.method_state
        scale = c["weight"] * (ctx.step >= c["start_step"]).astype(jnp.float32)
        src_emb = cl.embed_features(out["source"]["features"], grid)
        mix_emb = cl.embed_features(out["mixed"]["features"], grid)
        src_lbl = labels_to_grid(ctx.src["label"], grid)
        if c["variant"] == "cluda":
            losses["loss_contrast_src"] = scale * cl.cluda_loss(
                src_emb, src_lbl, order_quirk=c["quirk"]
            )
            losses["loss_contrast_mix"] = scale * cl.cluda_loss(
                mix_emb,
                labels_to_grid(mix["label"], grid),
                cl.values_to_grid(mix["weight"], grid),
                order_quirk=c["quirk"],
            )
            return losses, method_state, metrics
        # Per-pixel facts of the mixed images, taken to the grid at the same pixels as the
        # labels (nearest): confidence (1 where source is pasted), origin, the teacher's top-K
        # classes, and whether the row is used at all.
        t_probs = jax.nn.softmax(out["pseudo"]["logits"].astype(jnp.float32), axis=-1)
        pasted = mix["mask"] > 0.5
        rows = teacher.kept_rows(t_probs.shape[1], s["ignore_top"], s["ignore_bottom"])
        g = dict(
            label=labels_to_grid(mix["label"], grid),
            confidence=cl.labels_to_grid(jnp.where(pasted, 1.0, jnp.max(t_probs, axis=-1)), grid),
            is_target=~cl.labels_to_grid(pasted, grid),
            valid=cl.labels_to_grid(pasted | rows[None, :, None], grid),
            ruled_in=cl.labels_to_grid(jax.lax.top_k(t_probs, topk)[1], grid),
        )
        n_src = src_lbl.size
        ones = jnp.ones((n_src,), bool)
        loss, method_state, stats = cl.pgpc_loss(
            keys.method,
            jnp.concatenate([_flat(src_emb), _flat(mix_emb)]),
            jnp.concatenate([src_lbl.reshape(-1), g["label"].reshape(-1)]),
            jnp.concatenate([jnp.ones((n_src,)), g["confidence"].reshape(-1)]),
            jnp.concatenate([~ones, g["is_target"].reshape(-1)]),
            jnp.concatenate([ones, g["valid"].reshape(-1)]),
            jnp.concatenate([jnp.zeros((n_src, topk), jnp.int32), g["ruled_in"].reshape(-1, topk)]),
            method_state,
            **c["loss"],
        )
        losses["loss_contrast"] = scale * loss
        return losses, method_state, {**metrics, **stats}

    return losses
