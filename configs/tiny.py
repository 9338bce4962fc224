"""Tiny model for tests: a 5-block MiT with the DAFormer head at reduced width.

python -m pytest tests

`embedded_run(...)` is the embedded PGPC run at test size that the end-to-end tests and the
benchmarks/kill_resume.py and benchmarks/two_processes.py scripts train.
"""

from configs import base, synthetic
from pgpc_jax import methods


def get_config(method: str | None = None):
    """The base recipe with the tiny model, training `method` (default PGPC)."""
    config = methods.configure(base.get_config(), method)
    config.model.backbone = "tiny"
    config.model.head_embed_dim = 32
    config.model.head_channels = 32
    return config


def embedded_run(
    data_dir: str,
    steps: int,
    batch_size: int = 2,
    num_devices: int = 1,
    eval_every_steps: int = 1000,
    method: str | None = None,
):
    """configs/synthetic.py:`method` (default PGPC, whose prototypes are part of the state) on
    the `tiny` build of the embedded dataset (`python -m data_pipelines.build --dataset
    synthetic_shift --config tiny`): 32x32 crops, a 16-wide head, `steps` steps, checkpoints every 2, a global `batch_size` over
    `num_devices` devices (0: all), evaluation every `eval_every_steps` and at the end."""
    config = synthetic.get_config(method)
    config.data.data_dir = data_dir
    for group in (config.data.source, config.data.target, config.data.val):
        group.dataset = "synthetic_shift/tiny"
        group.batch_size = batch_size
    for group in (config.data.source, config.data.target):
        group.scale = ()
        group.crop_size = (32, 32)
    config.data.val.scale = ()
    config.data.source.rcs_min_pixels = 10
    if config.method == "pgpc":
        config.pgpc.grid = (5, 5)
        config.pgpc.num_anchors = 16
        config.pgpc.num_negatives = 32
        config.pgpc.num_unreliable = 16
    config.model.head_embed_dim = config.model.head_channels = 16
    config.mesh.num_devices = num_devices
    config.num_train_steps = steps
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_every_steps = eval_every_steps
    config.eval.num_visualizations = 1
    return config
