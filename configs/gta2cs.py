"""GTA5 -> Cityscapes with DAFormer (MiT-B5 + DAFormer head).

python -m pgpc_jax.main --config configs/gta2cs.py --workdir runs/gta2cs
"""

from configs import base


def get_config():
    config = base.get_config()
    return config
