"""The segmentor: MiT encoder + decode head, and whole-image inference.

`Segmentor(images, train) -> {'logits': [B, H/4, W/4, K], 'features': 4 stages, <aux>: ...}`:
training needs the stride-4 logits (upsampled in the loss, as mmseg does), the encoder features
(ImageNet feature distance, pixel contrast) and the outputs of any auxiliary head a method asks
for (a projection head, a self-labelling head). The variable tree is
`{'params': {'backbone', 'decode_head'[, 'auxiliary_head']}, 'batch_stats': {...}}`; auxiliary
heads sit under `auxiliary_head/<name>`, as mmseg's `auxiliary_head`: they train with the
head learning-rate rule (their torch names contain 'head') and exports leave them out.

A model is described by the `model` group of a config (see `configs/base.py`); `build_segmentor`
is the one place that turns it into a module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgpc_jax.models.heads import DAFormerHead, SegFormerHead
from pgpc_jax.models.layers import resize_bilinear
from pgpc_jax.models.mit import MIT_VARIANTS, MiTConfig, MixVisionTransformer

Dtype = Any
HEADS = ("daformer", "segformer")
REMAT = ("none", "blocks", "all")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Segmentor(nn.Module):
    """Encoder-decoder segmentation model (mmseg `EncoderDecoder`).

    Attributes:
      backbone: shape of the MiT encoder.
      head: 'daformer' or 'segformer'.
      num_classes: number of output classes.
      head_embed_dim: per-level embedding width of the head (256 in DAFormer; SegFormer uses 256
        for b0/b1 and 768 for b2..b5).
      head_channels: width of the DAFormer fusion (ASPP / bottleneck).
      dropout_rate: channel dropout before the classifier.
      auxiliary_heads: ((name, module), ...): extra heads on the encoder features, each called
        as `module(features, train)`; its output is the model output `name`.
      remat: activation recomputation in the backward pass: 'none', 'blocks' (each encoder
        block), 'all' (the blocks and the decode head). Same parameters, same values.
    """

    backbone: MiTConfig = MiTConfig()
    head: str = "daformer"
    num_classes: int = 19
    head_embed_dim: int = 256
    head_channels: int = 256
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    auxiliary_heads: tuple[tuple[str, nn.Module], ...] = ()
    remat: str = "none"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.remat not in REMAT:
            raise ValueError(f"model.remat={self.remat!r}: expected one of {REMAT}")
        self.encoder = MixVisionTransformer(
            self.backbone, name="backbone", remat_blocks=self.remat != "none", **kw
        )
        # Under 'all' the decode head is recomputed too; `train` and `dropout` (arguments 2 and
        # 3, counting the module) are Python bools, static.
        remat_head = (
            (lambda cls: nn.remat(cls, static_argnums=(2, 3)))
            if self.remat == "all"
            else (lambda cls: cls)
        )
        if self.head == "daformer":
            self.decoder = remat_head(DAFormerHead)(
                self.num_classes,
                embed_dim=self.head_embed_dim,
                channels=self.head_channels,
                dropout_rate=self.dropout_rate,
                name="decode_head",
                **kw,
            )
        elif self.head == "segformer":
            self.decoder = remat_head(SegFormerHead)(
                self.num_classes,
                embed_dim=self.head_embed_dim,
                dropout_rate=self.dropout_rate,
                name="decode_head",
                **kw,
            )
        else:
            raise ValueError(f"model.head={self.head!r}: expected one of {HEADS}")
        if self.auxiliary_heads:
            self.auxiliary = AuxiliaryHeads(self.auxiliary_heads, name="auxiliary_head")

    def __call__(
        self, images: jax.Array, train: bool = False, dropout: bool | None = None
    ) -> dict[str, Any]:
        """images [B, H, W, 3] normalised -> named outputs.

        Returns:
          {'logits': float32 [B, H/4, W/4, K], 'features': the 4 encoder stages
          [B, H/s, W/s, C_s] for s = 4, 8, 16, 32, and one entry per auxiliary head}.

        `train` puts BatchNorm on batch statistics (updating the running ones when
        `batch_stats` is mutable); `dropout` (default: `train`) switches channel dropout and
        stochastic depth. DAFormer's teacher runs with train=True, dropout=False.
        """
        dropout = train if dropout is None else dropout
        features = self.encoder(images, dropout)
        logits = self.decoder(features, train, dropout)
        outputs = {"logits": logits.astype(jnp.float32), "features": features}
        if self.auxiliary_heads:
            outputs.update(self.auxiliary(features, train))
        return outputs

    def auxiliary_outputs(
        self, images: jax.Array, train: bool = False, dropout: bool | None = None
    ) -> dict[str, Any]:
        """`__call__` without the decode head: {'features', one entry per auxiliary head} (a
        forward that needs an auxiliary head only, as mmseg's `mode='aux'`). The same values
        and random draws as `__call__`'s entries."""
        dropout = train if dropout is None else dropout
        features = self.encoder(images, dropout)
        outputs = {"features": features}
        if self.auxiliary_heads:
            outputs.update(self.auxiliary(features, train))
        return outputs

    def encode(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
        """Encoder features only (the frozen ImageNet model of the feature distance)."""
        return self.encoder(images, train)


class AuxiliaryHeads(nn.Module):
    """The auxiliary heads of a method, each under its own name: {name: head(features, train)}."""

    heads: tuple[tuple[str, nn.Module], ...] = ()

    @nn.compact
    def __call__(self, features: list[jax.Array], train: bool) -> dict[str, Any]:
        return {
            name: head.clone(name=name, parent=self)(features, train) for name, head in self.heads
        }


RESERVED_OUTPUTS = ("logits", "features")


def build_segmentor(
    model_cfg: Mapping[str, Any], auxiliary_heads: Mapping[str, nn.Module] | None = None
) -> Segmentor:
    """Build a `Segmentor` from the `model` config group.

    Fields: backbone ('b0'..'b5', 'tiny'), head, num_classes, head_embed_dim, head_channels,
    dropout_rate, drop_path_rate, layer_norm ('mmseg' or 'hf' eps convention), dtype, remat.
    `auxiliary_heads` ({name: unbound module}) are a method's extra heads
    (`methods.<name>.auxiliary_heads(config)`); evaluation, prediction and export build the
    segmentor without them.
    """
    auxiliary_heads = dict(auxiliary_heads or {})
    for name in auxiliary_heads:
        if name in RESERVED_OUTPUTS or not name.isidentifier():
            raise ValueError(
                f"auxiliary head name {name!r}: use an identifier other than {RESERVED_OUTPUTS}"
            )
    name = model_cfg["backbone"]
    if name not in MIT_VARIANTS:
        raise ValueError(f"model.backbone={name!r}: expected one of {sorted(MIT_VARIANTS)}")
    mit = dataclasses.replace(MIT_VARIANTS[name], drop_path_rate=model_cfg["drop_path_rate"])
    if model_cfg["layer_norm"] == "hf":  # HF transformers: every LayerNorm at torch's 1e-5
        mit = dataclasses.replace(mit, block_eps=1e-5)
    elif model_cfg["layer_norm"] != "mmseg":
        raise ValueError(f"model.layer_norm={model_cfg['layer_norm']!r}: expected 'mmseg' or 'hf'")
    # A run saved before the field existed recomputes nothing.
    remat = model_cfg.get("remat", "none")
    if remat not in REMAT:
        raise ValueError(f"model.remat={remat!r}: expected one of {REMAT}")
    if model_cfg["dtype"] not in DTYPES:
        raise ValueError(f"model.dtype={model_cfg['dtype']!r}: expected one of {sorted(DTYPES)}")
    return Segmentor(
        backbone=mit,
        head=model_cfg["head"],
        num_classes=model_cfg["num_classes"],
        head_embed_dim=model_cfg["head_embed_dim"],
        head_channels=model_cfg["head_channels"],
        dropout_rate=model_cfg["dropout_rate"],
        dtype=DTYPES[model_cfg["dtype"]],
        auxiliary_heads=tuple(sorted(auxiliary_heads.items())),
        remat=remat,
    )


def init_variables(model: Segmentor, rng: jax.Array, image_size=(64, 64)) -> dict:
    """Initialise the variables (params and batch_stats) with a dummy batch, jitted.

    The initialisers draw from an RBG key derived from `rng` (deterministic in `rng`): XLA
    compiles one threefry computation per parameter, which takes minutes for MiT-B5 on a CPU,
    while RBG compiles in seconds.
    """
    dummy = jnp.zeros((1, *image_size, 3), jnp.float32)

    def init(rng):
        key = jax.random.key(jax.random.bits(rng, dtype=jnp.uint32), impl="rbg")
        return model.init({"params": key, "dropout": key}, dummy, train=False)

    return dict(jax.jit(init)(rng))


def abstract_variables(model: Segmentor, image_size=(64, 64)) -> dict:
    """Shapes and dtypes of the variables, computed without allocating them."""
    return jax.eval_shape(lambda k: init_variables(model, k, image_size), jax.random.key(0))


def count_params(tree) -> int:
    """Number of scalars in a (possibly abstract) parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def predict_logits(model: Segmentor, variables: Mapping, images: jax.Array) -> jax.Array:
    """Whole-image inference: logits [B, H, W, K] at the input size.

    As mmseg's `encode_decode`: the stride-4 logits are upsampled bilinearly
    (align_corners=False) to the input size. Evaluation mode: running BN statistics, no dropout.
    """
    logits = model.apply(variables, images, train=False)["logits"]
    return resize_bilinear(logits, images.shape[1:3], align_corners=False)
