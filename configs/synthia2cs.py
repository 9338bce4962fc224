"""SYNTHIA -> Cityscapes with PGPC. No SYNTHIA config was released; this is the released GTA
setting (lambda_t 0.8, contrast weight 1, 60k iterations) on the SYNTHIA data of DAFormer.

  python -m pgpc_jax.main --config configs/synthia2cs.py --workdir runs/synthia2cs
"""

from configs import base, synthia2cs_daformer


def get_config():
    config = base.use_pgpc(synthia2cs_daformer.get_config())
    config.num_train_steps = 60_000
    return config
