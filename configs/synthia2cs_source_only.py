"""SYNTHIA -> Cityscapes source-only baseline (DAFormer architecture, source CE only).

python -m pgpc_jax.main --config configs/synthia2cs_source_only.py --workdir runs/synthia2cs_so
"""

from configs import synthia2cs_daformer


def get_config():
    config = synthia2cs_daformer.get_config()
    config.uda.method = "source_only"
    config.uda.fd_lambda = 0.0
    return config
