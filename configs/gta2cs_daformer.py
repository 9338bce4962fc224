"""GTA5 -> Cityscapes with DAFormer (MiT-B5 + DAFormer head), the recipe of configs/base.py.

Start from ImageNet MiT-B5 (NVlabs mit_b5.pth) and the datasets built with data_pipelines.build:
  python -m pgpc_jax.main --config configs/gta2cs_daformer.py --workdir runs/gta2cs_daformer \
      --config.init_from.path=pretrained/mit_b5.pth
"""

from configs import base


def get_config():
    config = base.get_config()
    config.init_from.path = "pretrained/mit_b5.pth"
    return config
