"""GTA5 -> Cityscapes: MiT-B5 + DAFormer head from ImageNet MiT-B5, the recipe of configs/base.py,
with the method as the config's argument (default PGPC):

  python -m pgpc_jax.main --config configs/gta2cs.py --workdir runs/gta2cs \
      --config.init_from.path=pretrained/mit_b5.pth
  python -m pgpc_jax.main --config configs/gta2cs.py:daformer --workdir runs/gta2cs_daformer
  python -m pgpc_jax.main --config configs/gta2cs.py:source_only --workdir runs/gta2cs_so

Methods: `pgpc_jax.methods.METHODS`. PGPC trains 60k iterations as released; DAFormer and the
source-only baseline 40k, as DAFormer.
"""

from configs import base
from pgpc_jax import methods

# Iterations per method where they differ from DAFormer's 40k.
NUM_TRAIN_STEPS = {"pgpc": 60_000}


def benchmark_config():
    """GTA5 -> Cityscapes before a method is chosen (the base recipe, ImageNet MiT-B5)."""
    config = base.get_config()
    config.init_from.path = "pretrained/mit_b5.pth"
    return config


def with_method(config, method: str | None):
    """`config` training `method` (default PGPC) for its number of iterations."""
    methods.configure(config, method)
    config.num_train_steps = NUM_TRAIN_STEPS.get(config.method, 40_000)
    return config


def get_config(method: str | None = None):
    return with_method(benchmark_config(), method)
