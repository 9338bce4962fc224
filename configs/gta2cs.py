"""GTA5 -> Cityscapes: MiT-B5 + DAFormer head from ImageNet MiT-B5, the recipe of configs/base.py,
with the method as the config's argument (default PGPC):

  python -m pgpc_jax.main --config configs/gta2cs.py --workdir runs/gta2cs \
      --config.init_from.path=pretrained/mit_b5.pth
  python -m pgpc_jax.main --config configs/gta2cs.py:daformer --workdir runs/gta2cs_daformer
  python -m pgpc_jax.main --config configs/gta2cs.py:source_only --workdir runs/gta2cs_so
  python -m pgpc_jax.main --config configs/gta2cs.py:sepico --workdir runs/gta2cs_sepico
  python -m pgpc_jax.main --config configs/gta2cs.py:fda --workdir runs/gta2cs_fda_b01 \
      --config.fda.beta=0.01            # FDA's three models: beta 0.01, 0.05, 0.09
  python -m pgpc_jax.main --config configs/gta2cs.py:fda --workdir runs/gta2cs_fda_dacs \
      --config.fda.with_dacs=True       # FDA's styling inside DAFormer self-training
  python -m pgpc_jax.main --config configs/gta2cs.py:fda_sst --workdir runs/gta2cs_fda_sst
                                        # a self-training round on folder/pseudo_labels
  python -m pgpc_jax.main --config configs/gta2cs.py:fda_supcon --workdir runs/gta2cs_supcon
                                        # FDA + supervised contrast on folder/pseudo_labels

Methods: `pgpc_jax.methods.METHODS` and their recipes (`fda_sst`, `fda_supcon`). PGPC trains 60k iterations
as released; DAFormer, SePiCo, FDA and the source-only baseline 40k (DAFormer's schedule).
SePiCo also takes its released data setting (`with_sepico_data`): 640x640 source crops, the
whole 1280x640 Cityscapes image as the target (cropped on device by the class-balanced crop),
testing at 1280x640, seed 76.
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


# SePiCo's released GTA -> Cityscapes data (`uda_gta_to_cityscapes_640x640_no_crop.py`) and seed.
SEPICO_CROP = (640, 640)
SEPICO_TARGET_SCALE = (1280, 640)
SEPICO_SEED = 76


def with_sepico_data(config, target_scale=SEPICO_TARGET_SCALE, crop=SEPICO_CROP):
    """SePiCo's data setting: source crops of `crop`; the target resized to `target_scale`
    (W, H) and loaded whole (its pipeline crop is the whole image; the method crops it on
    device); validation at `target_scale`."""
    width, height = target_scale
    config.data.source.crop_size = crop
    config.data.target.scale = target_scale
    config.data.target.crop_size = (height, width)
    config.data.val.scale = target_scale
    config.eval.crop_size = crop
    return config


def with_method(config, method: str | None):
    """`config` training `method` (default PGPC) for its number of iterations."""
    methods.configure(config, method)
    config.num_train_steps = NUM_TRAIN_STEPS.get(config.method, 40_000)
    if config.method == "sepico":
        with_sepico_data(config)
        config.seed = SEPICO_SEED
    return base.with_pseudo_label_target(config)


def get_config(method: str | None = None):
    return with_method(benchmark_config(), method)
