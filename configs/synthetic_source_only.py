"""Source-only baseline of the embedded default run (no target data in the loss).

python -m pgpc_jax.main --config configs/synthetic_source_only.py --workdir runs/synthetic_so
"""

from configs import synthetic_daformer


def get_config():
    config = synthetic_daformer.get_config()
    config.uda.method = "source_only"
    return config
