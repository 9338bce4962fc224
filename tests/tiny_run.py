"""The tiny training run the end-to-end tests share: the embedded PGPC config at test size.

Also imported by the config files the multi-process test writes for its subprocesses, so it
imports nothing from pytest.
"""

from __future__ import annotations

import json
import os

import jax

from configs import synthetic
from pgpc_jax import checkpointing, train


def tiny_config(data_dir: str, steps: int, batch_size: int = 2, num_devices: int = 1):
    """configs/synthetic.py (PGPC: prototypes are part of the state) on the `tiny` build of the
    embedded dataset, 32x32 crops, a 16-wide head, `steps` steps with checkpoints every 2."""
    config = synthetic.get_config()
    config.data.data_dir = data_dir
    for group in (config.data.source, config.data.target, config.data.val):
        group.dataset = "synthetic_shift/tiny"
        group.batch_size = batch_size
    for group in (config.data.source, config.data.target):
        group.scale = ()
        group.crop_size = (32, 32)
    config.data.val.scale = ()
    config.data.source.rcs_min_pixels = 10
    config.contrast.grid = (5, 5)
    config.contrast.num_anchors = 16
    config.contrast.num_negatives = 32
    config.contrast.num_unreliable = 16
    config.model.head_embed_dim = config.model.head_channels = 16
    config.mesh.num_devices = num_devices
    config.num_train_steps = steps
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 1000  # only the final evaluation
    config.eval.num_visualizations = 1
    return config


def final_state(config, workdir: str):
    """(the latest checkpoint's TrainState on the host, {iterator name: [each process's saved
    position]}), read in this process whatever process count wrote it."""
    _, _, abstract = train.abstract_train_state(config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
    )
    ckpts = checkpointing.RunCheckpoints(workdir, keep=config.keep_checkpoints)
    state, step = ckpts.read(abstract)
    ckpts.close()
    positions = {}
    for name in ("source", "target"):
        folder = os.path.join(workdir, "checkpoints", str(step), f"data_{name}")
        positions[name] = [
            json.load(open(os.path.join(folder, f)))
            for f in sorted(os.listdir(folder))
            if f.startswith("process_")
        ]
    return jax.device_get(state), positions
