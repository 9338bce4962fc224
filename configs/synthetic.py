"""The embedded benchmark: a tiny MiT on the embedded domain-shift dataset (built on first use),
on a CPU in minutes, with the method as the config's argument (default PGPC):

  python -m pgpc_jax.main --config configs/synthetic.py --workdir runs/synthetic
  python -m pgpc_jax.main --config configs/synthetic.py:daformer --workdir runs/synthetic_daformer
  python -m pgpc_jax.main --config configs/synthetic.py:source_only --workdir runs/synthetic_so
  python -m pgpc_jax.main --config configs/synthetic.py:sepico --workdir runs/synthetic_sepico
  python -m pgpc_jax.main --config configs/synthetic.py:fda --workdir runs/synthetic_fda \
      --config.fda.beta=0.05
  python -m pgpc_jax.main --config configs/synthetic.py:fda_sst --workdir runs/synthetic_fda_sst
  python -m pgpc_jax.main --config configs/synthetic.py:fda_supcon --workdir runs/synthetic_supcon

(`fda_sst` and `fda_supcon` train on the pseudo-labelled target `folder/pseudo_labels`:
`docs/data.md`, "Pseudo-labels".)

Every method trains 600 steps.
"""

from configs import base
from pgpc_jax import methods


def cpu_sized(config):
    """The embedded benchmark's CPU-sized model and schedule on `config` (also the CPU size of
    `configs/folder.py:METHOD,cpu`): a tiny MiT from random weights, 128x128 crops, 600 steps."""
    config.init_from.path = ""
    config.model.backbone = "tiny"
    config.model.head_embed_dim = 64
    config.model.head_channels = 64
    config.model.drop_path_rate = 0.0
    for group in (config.data.source, config.data.target):
        group.crop_size = (128, 128)
    # RCS minimum pixels (counted on the stored 256x512 labels; DAFormer: 3000 of ~1280x720).
    config.data.source.rcs_min_pixels = 200

    # 600 steps of 2+2 crops: minutes on a 2-core CPU. The schedule is DAFormer's scaled to the
    # run: warm-up 50 steps, and an EMA horizon of ~100 steps (alpha 0.99) instead of 0.999's
    # ~1000, which would be longer than the run.
    config.num_train_steps = 600
    config.log_every_steps = 50
    config.eval_every_steps = 600
    config.checkpoint_every_steps = 200
    config.uda.ema_alpha = 0.99
    # The tiny model starts from random weights: a higher learning rate than ImageNet fine-tuning.
    config.optimizer.learning_rate = 6e-4
    config.optimizer.warmup_steps = 50
    config.eval.num_visualizations = 4
    return config


def cpu_sized_method(config):
    """The method's values scaled to `cpu_sized`'s crops and schedule."""
    if config.method == "pgpc":
        pgpc = config.pgpc
        # 128x128 crops: the released 65x65 grid of 512 crops (stride 512/64) becomes 17x17, and
        # the sample sizes shrink with the pixel count (2 x 2 x 17 x 17 = 1156 pixels per step).
        pgpc.grid = (17, 17)
        pgpc.num_anchors = 256
        pgpc.num_negatives = 512
        pgpc.num_unreliable = 256
    if config.method == "sepico":
        # The contrastive terms from step 45 = 3000 / 40000 x 600. The other values stay as
        # released (a BankCL run's 200 centroids per class span the last third of the run).
        config.sepico.start_step = 45
    if config.method == "fda":
        # The contrast's sample: a quarter of the 32x32 projection pixels of each 128x128 crop
        # (the default 1024 of 128x128 at 512 crops); a projection as wide as the head.
        config.fda.contrast_samples = 256
        config.fda.contrast_channels = 64
    return config


def benchmark_config():
    """The embedded benchmark before a method is chosen."""
    config = cpu_sized(base.get_config())
    data = config.data
    data.source.dataset = "synthetic_shift/default"
    data.source.split = "source_train"
    data.target.dataset = "synthetic_shift/default"
    data.target.split = "target_train"
    data.val.dataset = "synthetic_shift/default"
    data.val.split = "target_val"
    # The images are generated at 256x512; train and test at half resolution (128x256, what
    # DAFormer's 1024x512 Cityscapes is to 2048x1024), with 128x128 crops.
    for group in (data.source, data.target, data.val):
        group.scale = (256, 128)
    data.val.batch_size = 10

    # No rectification border or ego car in the generated scenes: keep every pseudo-label row.
    config.uda.pseudo_ignore_top = 0
    config.uda.pseudo_ignore_bottom = 0
    # Random initialisation: no ImageNet encoder to stay close to, so no feature distance.
    config.uda.fd_lambda = 0.0
    return config


def get_config(method: str | None = None):
    config = cpu_sized_method(methods.configure(benchmark_config(), method))
    if config.method == "sepico":
        # SePiCo's released setting scaled to the run: the whole 128x256 target image, cut to
        # the 128x128 source crop size by the class-balanced crop (released: 1280x640 -> 640x640).
        config.data.target.crop_size = (128, 256)
    return base.with_pseudo_label_target(config)
