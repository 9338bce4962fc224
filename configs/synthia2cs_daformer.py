"""SYNTHIA -> Cityscapes with DAFormer: the GTA recipe with SYNTHIA at its native 1280x760.

Evaluated on the 16 classes SYNTHIA shares with Cityscapes (mIoU16) and the usual 13.
  python -m pgpc_jax.main --config configs/synthia2cs_daformer.py --workdir runs/synthia2cs_daformer
"""

from configs import gta2cs_daformer


def get_config():
    config = gta2cs_daformer.get_config()
    config.data.source.dataset = "synthia/daformer"
    config.data.source.scale = (1280, 760)
    return config
