"""GTA5 -> Cityscapes source-only baseline (DAFormer architecture, source CE only).

python -m pgpc_jax.main --config configs/gta2cs_source_only.py --workdir runs/gta2cs_so
"""

from configs import gta2cs_daformer


def get_config():
    config = gta2cs_daformer.get_config()
    config.uda.method = "source_only"
    config.uda.fd_lambda = 0.0
    return config
