"""Tiny model for tests: a 5-block MiT with the DAFormer head at reduced width.

python -m pytest tests
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.backbone = "tiny"
    config.model.head_embed_dim = 32
    config.model.head_channels = 32
    return config
