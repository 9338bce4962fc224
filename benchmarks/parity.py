"""Numerical parity of our Flax SegFormer with HF transformers' PyTorch SegFormer.

  python -m benchmarks.parity

Builds `SegformerForSemanticSegmentation` with random weights (perturbed away from their
initialisation, BN running statistics included; nothing is downloaded), converts its
`state_dict()` with `pgpc_jax.convert` (the `hf` format), runs both in float32 on the same
non-square input whose sides are not multiples of 32, and reports for each stage feature and the
logits the relative error max|ours - hf| / max|hf|. Our model uses HF's LayerNorm eps
(`model.layer_norm='hf'`) for this comparison; with the mmseg eps of the original checkpoints
the outputs differ by design. `tests/parity_hf_test.py` asserts the same numbers stay below 1e-4.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from pgpc_jax.models.mit import MIT_VARIANTS, MiTConfig
from pgpc_jax.models.segmentor import Segmentor, abstract_variables
from pgpc_jax.torch_names import canonical_to_variables, check_against, hf_to_canonical

# name -> (MiT shape, decoder width, input (H, W))
CASES = {
    "b0": (MIT_VARIANTS["b0"], 256, (75, 101)),
    "wide_deep": (
        MiTConfig(embed_dims=(64, 128, 320, 512), depths=(3, 4, 5, 3)),
        384,
        (93, 130),
    ),
}
NUM_CLASSES = 19


def hf_segformer(mit: MiTConfig, decoder_dim: int, num_classes: int = NUM_CLASSES, seed: int = 0):
    """A randomly initialised HF SegFormer (eval mode), weights and BN buffers perturbed."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    config = SegformerConfig(
        hidden_sizes=list(mit.embed_dims),
        depths=list(mit.depths),
        num_attention_heads=list(mit.num_heads),
        sr_ratios=list(mit.sr_ratios),
        mlp_ratios=[mit.mlp_ratio] * 4,
        decoder_hidden_size=decoder_dim,
        num_labels=num_classes,
    )
    model = SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        bn = model.decode_head.batch_norm
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return model


def ours_like(mit: MiTConfig, decoder_dim: int, num_classes: int = NUM_CLASSES) -> Segmentor:
    """Our segmentor with the SegFormer head and HF's LayerNorm eps, dropout and drop-path off."""
    mit = dataclasses.replace(mit, block_eps=1e-5, drop_path_rate=0.0)
    return Segmentor(
        backbone=mit, head="segformer", num_classes=num_classes, head_embed_dim=decoder_dim
    )


def hf_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def variables_from_hf(model, ours: Segmentor) -> dict:
    canonical = hf_to_canonical(hf_state(model))
    template = abstract_variables(ours)
    check_against(canonical, template, "HF model")
    return canonical_to_variables(canonical, template)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def measure(name: str, seed: int = 0) -> dict[str, float]:
    """Relative error of stage1..stage4 features and the logits for one case of `CASES`."""
    import torch

    mit, decoder_dim, (h, w) = CASES[name]
    hf = hf_segformer(mit, decoder_dim, seed=seed)
    ours = ours_like(mit, decoder_dim)
    variables = variables_from_hf(hf, ours)
    images = np.random.default_rng(seed).normal(size=(2, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    ref_feats = [f.numpy().transpose(0, 2, 3, 1) for f in out.hidden_states]
    ref_logits = out.logits.numpy().transpose(0, 2, 3, 1)
    outputs = jax.jit(lambda v, x: ours.apply(v, x, train=False))(variables, images)
    logits, feats = outputs["logits"], outputs["features"]
    errors = {
        f"stage{i + 1}": relative_error(np.asarray(f), r)
        for i, (f, r) in enumerate(zip(feats, ref_feats))
    }
    errors["logits"] = relative_error(np.asarray(logits), ref_logits)
    return errors


def main() -> None:
    print(
        "| case | input | " + " | ".join(["stage1", "stage2", "stage3", "stage4", "logits"]) + " |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (_, _, (h, w)) in CASES.items():
        errors = measure(name)
        cells = " | ".join(
            f"{errors[k]:.1e}" for k in ["stage1", "stage2", "stage3", "stage4", "logits"]
        )
        print(f"| {name} | {h}x{w} | {cells} |")


if __name__ == "__main__":
    main()
