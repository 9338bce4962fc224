"""DAFormer: DACS self-training (lhoyer/DAFormer `mmseg/models/uda/dacs.py`).

Per step, in `forward_train`'s order: the EMA teacher update (done by the generic step, since
`needs_teacher`), the source cross-entropy and ImageNet feature distance on the source's thing
classes, the teacher's pseudo-labels of the target with the quality weight, ClassMix of source
onto target with colour jitter and blur, and the mixed images' weighted cross-entropy
(`uda/dacs.py`). Its settings are the shared `uda` group; it adds no group and no state.
"""

from __future__ import annotations

from pgpc_jax.uda import dacs


def configure(config) -> None:
    """The `uda` group of `configs/base.py` is DAFormer's recipe: nothing to change."""


def validate(config) -> None:
    """Nothing beyond the shared checks of the `uda` group."""


def needs_teacher(config) -> bool:
    return True


def needs_imnet(config) -> bool:
    return dacs.needs_imnet(config)


def auxiliary_heads(config) -> dict:
    return {}


def init_state(config, params) -> None:
    return None


def make_losses(config):
    s = dacs.settings(config)

    def losses(ctx):
        out = dacs.self_training(ctx, s, dacs.split_keys(ctx.rng))
        return out["losses"], ctx.method_state, out["metrics"]

    return losses
