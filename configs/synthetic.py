"""The embedded default run: PGPC (DAFormer + pixel contrast) with a tiny MiT on the embedded
domain-shift dataset (built on first use), on a CPU in minutes.

  python -m pgpc_jax.main --config configs/synthetic.py --workdir runs/synthetic

Baselines: configs/synthetic_daformer.py, configs/synthetic_source_only.py.
"""

from configs import base, synthetic_daformer


def get_config():
    config = base.use_pgpc(synthetic_daformer.get_config())
    contrast = config.contrast
    # 128x128 crops: the released 65x65 grid of 512 crops (stride 512/64) becomes 17x17, and the
    # sample sizes shrink with the pixel count (2 x 2 x 17 x 17 = 1156 pixels per step).
    contrast.grid = (17, 17)
    contrast.num_anchors = 256
    contrast.num_negatives = 512
    contrast.num_unreliable = 256
    return config
