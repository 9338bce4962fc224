"""SYNTHIA -> Cityscapes with DAFormer: the GTA recipe with SYNTHIA at its native 1280x760.

Evaluated on the 16 classes SYNTHIA shares with Cityscapes (mIoU16) and the usual 13.

  python -m pgpc_jax.main --config configs/synthia2cs.py --workdir runs/synthia2cs
"""

from configs import base


def get_config():
    config = base.get_config()
    config.data.source.dataset = "synthia/daformer"
    config.data.source.scale = (1280, 760)
    return config
