"""A minimal PyTorch re-implementation of the ORIGINAL DAFormer segmentor, for parity tests.

`TorchDAFormer` mirrors mmseg 0.16's `EncoderDecoder` (lhoyer/DAFormer
`mmseg/models/segmentors/encoder_decoder.py`) as DAFormer configures it: a `backbone` (the MiT of
`tests/torch_mit.py`), a `decode_head` (the DAFormer head of `tests/torch_daformer_head.py`), no
neck and no auxiliary head. Its `state_dict()` keys are therefore the original `backbone.*` and
`decode_head.*` keys, the ones DAFormer's `tools/test.py` loads after stripping `model.`.

`forward` is the test-time `whole_inference` with `rescale` to the input size: `encode_decode`
(backbone, head logits at stride 4, bilinear upsampling with the head's align_corners=False to
the image size); the second resize to `ori_shape` is the identity when that is the input size.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch_daformer_head
import torch_mit

# DAFormer tools/test.py: load_checkpoint(..., revise_keys=[(r'^module\.', ''), ('model.', '')]);
# mmcv applies each with an unanchored re.sub, so 'model.' is a regex ('.' is any character).
DAFORMER_TEST_REVISE_KEYS = ((r"^module\.", ""), ("model.", ""))


def revise_keys(state: Mapping[str, Any], rules=DAFORMER_TEST_REVISE_KEYS) -> dict[str, Any]:
    """mmcv `load_checkpoint`'s key revision: every rule applied to every key, in order."""
    out = dict(state)
    for pattern, repl in rules:
        out = {re.sub(pattern, repl, k): v for k, v in out.items()}
    return out


class TorchDAFormer(nn.Module):
    """mmseg EncoderDecoder(backbone=MiT, decode_head=DAFormerHead), inference only."""

    def __init__(self, backbone: torch_mit.MixVisionTransformer, decode_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.align_corners = decode_head.align_corners

    def extract_feat(self, img: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(img)

    def encode_decode(self, img: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> logits [B, K, H, W]: head logits (stride 4) resized to the input."""
        out = self.decode_head(self.extract_feat(img))
        return torch_daformer_head.resize(
            out, size=img.shape[2:], mode="bilinear", align_corners=self.align_corners
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.encode_decode(img)


def torch_mit_for(model_cfg: Mapping[str, Any]) -> torch_mit.MixVisionTransformer:
    """The original MiT for one of our `model` config groups (`configs/base.py`).

    b0..b5 come from the original `mit_b*` table; 'tiny' exists only in our port, so its shape is
    read from `pgpc_jax.models.mit.MIT_VARIANTS`. `layer_norm='mmseg'` is the original eps 1e-6 of
    the block and stage norms, 'hf' is HF transformers' 1e-5.
    """
    name = model_cfg["backbone"]
    if name in torch_mit.NVLABS_VARIANTS:
        shape = dict(torch_mit.NVLABS_VARIANTS[name])
    else:
        from pgpc_jax.models.mit import MIT_VARIANTS

        v = MIT_VARIANTS[name]
        shape = dict(
            embed_dims=v.embed_dims,
            num_heads=v.num_heads,
            mlp_ratios=(v.mlp_ratio,) * 4,
            depths=v.depths,
            sr_ratios=v.sr_ratios,
        )
    eps = {"mmseg": torch_mit.NVLABS_NORM_EPS, "hf": 1e-5}[model_cfg["layer_norm"]]
    return torch_mit.MixVisionTransformer(
        **shape, norm_eps=eps, drop_path_rate=model_cfg["drop_path_rate"]
    )


def torch_model_for(model_cfg: Mapping[str, Any]) -> TorchDAFormer:
    """The original DAFormer segmentor (sepaspp head) for one of our `model` config groups."""
    if model_cfg["head"] != "daformer":
        raise NotImplementedError(f"model.head={model_cfg['head']!r}: only 'daformer'")
    backbone = torch_mit_for(model_cfg)
    # The stage widths, read off the stage norms.
    in_channels = [getattr(backbone, f"norm{i}").normalized_shape[0] for i in range(1, 5)]
    decoder_params = torch_daformer_head.sepaspp_decoder_params()
    decoder_params["embed_dims"] = model_cfg["head_embed_dim"]
    head = torch_daformer_head.DAFormerHead(
        in_channels=in_channels,
        channels=model_cfg["head_channels"],
        num_classes=model_cfg["num_classes"],
        dropout_ratio=model_cfg["dropout_rate"],
        decoder_params=decoder_params,
    )
    return TorchDAFormer(backbone, head)


def load_as_daformer_test(path: str, model_cfg: Mapping[str, Any]) -> TorchDAFormer:
    """A `.pth` loaded the way DAFormer's tools/test.py loads it: `model.*` revised to the
    segmentor's keys (`ema_model.*` become `ema_*` keys that mmcv's non-strict load skips); the
    segmentor's own keys must all be there (strict on them), in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    revised = revise_keys(saved["state_dict"])
    network = {k: v for k, v in revised.items() if not k.startswith("ema_")}
    model = torch_model_for(model_cfg)
    model.load_state_dict(network, strict=True)
    return model.eval()


def logits_error(model: TorchDAFormer, jax_logits_fn, image) -> float:
    """max |torch - JAX| / max |torch| of the logits of one image (numpy [1, H, W, 3]);
    `jax_logits_fn(image)` returns JAX's [1, H, W, K] at the image size."""
    import numpy as np

    with torch.no_grad():
        want = model(torch.from_numpy(image.transpose(0, 3, 1, 2).copy())).numpy()
    got = np.asarray(jax_logits_fn(image)).transpose(0, 3, 1, 2)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def run_export_error(path: str, workdir: str, image_shape=(1, 64, 96, 3)) -> float:
    """`logits_error` of a run's student (its latest checkpoint) against its DAFormer export at
    `path`, loaded as DAFormer's tools/test.py loads it, on one random normalised image."""
    import numpy as np

    from pgpc_jax import evaluation, weights
    from pgpc_jax.models import segmentor

    config, state, _ = weights.load_run(workdir)
    reference = load_as_daformer_test(path, config.model)
    model = segmentor.build_segmentor(config.model)
    image = np.random.default_rng(0).standard_normal(image_shape).astype(np.float32)
    variables = weights.run_variables(state)
    return logits_error(reference, lambda x: evaluation.whole_inference(model, variables, x), image)
