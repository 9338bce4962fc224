"""GTA5 -> Cityscapes with PGPC as released: DAFormer + the pixel contrast on the encoder
features, target weight q * lambda_t (0.8), 60k iterations (the released config; DAFormer 40k).

  python -m pgpc_jax.main --config configs/gta2cs.py --workdir runs/gta2cs \
      --config.init_from.path=pretrained/mit_b5.pth

The DAFormer baseline is configs/gta2cs_daformer.py, the source-only one gta2cs_source_only.py.
"""

from configs import base, gta2cs_daformer


def get_config():
    config = base.use_pgpc(gta2cs_daformer.get_config())
    config.num_train_steps = 60_000
    return config
