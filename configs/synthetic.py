"""The embedded default run: DAFormer self-training with a tiny MiT on the embedded
domain-shift dataset (built on first use), on a CPU in minutes.

  python -m pgpc_jax.main --config configs/synthetic.py --workdir runs/synthetic
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.backbone = "tiny"
    config.model.head_embed_dim = 64
    config.model.head_channels = 64
    config.model.drop_path_rate = 0.0

    data = config.data
    data.source.dataset = "synthetic_shift/default"
    data.source.split = "source_train"
    data.target.dataset = "synthetic_shift/default"
    data.target.split = "target_train"
    data.val.dataset = "synthetic_shift/default"
    data.val.split = "target_val"
    # The images are generated at 256x512: no resize, 256x256 crops.
    for group in (data.source, data.target):
        group.scale = ()
        group.crop_size = (256, 256)
    data.val.scale = ()
    data.val.batch_size = 8
    # RCS minimum pixels scaled to the smaller images (DAFormer: 3000 of ~1280x720 frames).
    data.source.rcs_min_pixels = 200

    # No rectification border or ego car in the generated scenes: keep every pseudo-label row.
    config.uda.pseudo_ignore_top = 0
    config.uda.pseudo_ignore_bottom = 0

    config.num_train_steps = 2000
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 500
    # The tiny model starts from random weights: a higher learning rate than ImageNet fine-tuning.
    config.optimizer.learning_rate = 6e-4
    config.optimizer.warmup_steps = 100
    config.eval.num_visualizations = 4
    return config
