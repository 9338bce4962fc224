"""Source only: the segmentor trained on labelled source crops (DAFormer's source-only baseline).

The step is DACS's source half: cross-entropy on the source (and the ImageNet feature distance
if `uda.fd_lambda` > 0; the benchmark configs turn it off, as the baselines we compare with).
No teacher, no target data in the loss, no method state.
"""

from __future__ import annotations

from pgpc_jax.uda import dacs


def configure(config) -> None:
    """No group of its own; the source-only baselines run without the feature distance."""
    config.uda.fd_lambda = 0.0


def validate(config) -> None:
    """Nothing beyond the shared checks."""


def needs_teacher(config) -> bool:
    return False


def needs_imnet(config) -> bool:
    return dacs.needs_imnet(config)


def auxiliary_heads(config) -> dict:
    return {}


def init_state(config, params) -> None:
    return None


def make_losses(config):
    s = dacs.settings(config)

    def losses(ctx):
        keys = dacs.split_keys(ctx.rng)
        out, _ = dacs.source_losses(ctx.student, ctx.imnet, ctx.src, keys.source, s)
        return out, ctx.method_state, {}

    return losses
