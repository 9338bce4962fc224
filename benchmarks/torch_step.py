"""The PyTorch reference of our source-only training step, for timing at equal work.

`TorchSourceOnlyStep(config, variables)` is DAFormer's source-only step written the idiomatic
PyTorch way, on the original segmentor (the MiT and DAFormer-head transcriptions of `tests/`,
NCHW, float32 as DAFormer trains) loaded with our weights:

  forward in train mode (BatchNorm on batch statistics, channel dropout and stochastic depth as
  configured) -> stride-4 logits upsampled bilinearly to the crop (align_corners=False) ->
  mmseg cross-entropy (ignore 255, mean over all pixels) -> backward -> AdamW over mmcv's
  parameter groups (head 10x lr, no decay on encoder norms) at our poly + warm-up rate.

Given the same weights and batch (and no dropout), its first-step loss equals ours to float
tolerance (`tests/benchmarks_torch_step_test.py`), so `step_time.py --torch` compares equal work.
`--bf16` runs the forward and loss under `torch.autocast(bfloat16)`, the fair mixed-precision row.

torch is the test extra (`requirements-test.txt`); this module imports it on use.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import numpy as np

_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")


def _torch_segmentor():
    """The original-DAFormer transcription in `tests/` (imported from there, not copied)."""
    if _TESTS not in sys.path:
        sys.path.insert(0, _TESTS)
    import torch_segmentor

    return torch_segmentor


def torch_learning_rates(config, step: int, names: list[str]) -> list[float]:
    """Each parameter group's rate at `step`: mmcv's key rule and our schedule (`pgpc_jax.optim`)."""
    from pgpc_jax import optim

    o = config.optimizer
    keys = optim.custom_keys(o.head_lr_mult, o.norm_decay_mult)
    rates = []
    for name in names:
        mult = keys.get(name, {}).get("lr_mult", 1.0)
        rates.append(
            float(
                optim.learning_rate(
                    step,
                    o.learning_rate * mult,
                    config.num_train_steps,
                    o.warmup_steps,
                    o.warmup_ratio,
                    o.poly_power,
                    o.min_lr,
                )
            )
        )
    return rates


class TorchSourceOnlyStep:
    """One source-only training step in PyTorch; `__call__(image, label) -> loss` (a float).

    Args:
      config: a source-only config (its `model`, `optimizer`, `num_train_steps`).
      variables: our Flax variables {'params', 'batch_stats'}, loaded into the torch model.
      bf16: forward and loss under `torch.autocast('cpu' or 'cuda', bfloat16)`.
      device: torch device ('cpu', 'cuda').
    """

    def __init__(self, config, variables: Mapping[str, Any], bf16: bool = False, device="cpu"):
        import torch

        from pgpc_jax import convert, optim

        self.torch, self.config, self.bf16, self.device = torch, config, bf16, device
        reference = _torch_segmentor()
        model = reference.torch_model_for(config.model)
        # Our DAFormer-format state dict, keys revised as DAFormer's tools/test.py revises them.
        state = reference.revise_keys(convert.from_flax(variables, "daformer"))
        model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
        self.model = model.to(device).train()
        o = config.optimizer
        keys = optim.custom_keys(o.head_lr_mult, o.norm_decay_mult)
        groups: dict[str, list] = {}
        for name, p in self.model.named_parameters():
            groups.setdefault(optim.match_custom_key(name, keys), []).append(p)
        self.group_names = sorted(groups)
        self.optimizer = torch.optim.AdamW(
            [
                dict(
                    params=groups[g],
                    weight_decay=o.weight_decay * keys.get(g, {}).get("decay_mult", 1.0),
                )
                for g in self.group_names
            ],
            lr=o.learning_rate,
            betas=(o.b1, o.b2),
            eps=o.eps,
        )
        self.step_count = 0

    def batch(self, image: np.ndarray, label: np.ndarray):
        """Our NHWC float image and int label (numpy) as torch tensors on the device."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
        return x.to(self.device), torch.from_numpy(label.astype(np.int64)).to(self.device)

    def loss(self, x, y):
        torch = self.torch
        F = torch.nn.functional
        kind = "cuda" if str(self.device).startswith("cuda") else "cpu"
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model.decode_head(self.model.backbone(x))
            logits = F.interpolate(
                logits.float(), size=y.shape[1:], mode="bilinear", align_corners=False
            )
            # mmseg: per-pixel CE with ignored pixels 0, averaged over every pixel.
            return F.cross_entropy(logits, y, ignore_index=255, reduction="none").mean()

    def __call__(self, x, y) -> float:
        for group, lr in zip(
            self.optimizer.param_groups,
            torch_learning_rates(self.config, self.step_count, self.group_names),
        ):
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        return float(loss.detach())

    def synchronize(self) -> None:
        if str(self.device).startswith("cuda"):
            self.torch.cuda.synchronize()

    def peak_gib(self) -> float:
        if str(self.device).startswith("cuda"):
            return self.torch.cuda.max_memory_allocated() / 2**30
        return float("nan")
