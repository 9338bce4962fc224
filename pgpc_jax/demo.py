"""Prediction demo on a generated street scene (CLI: `python -m pgpc_jax.demo`).

  python -m pgpc_jax.demo --config configs/gta2cs.py --out runs/demo

Draws one image of the embedded domain-shift dataset (target style), initialises the config's
model with random weights, writes them as a Flax weights directory, and runs the prediction CLI's
code path on the image. With random weights the prediction is noise: this exercises the whole
inference path (model, weights directory, normalisation, resizing, outputs) on any machine,
without datasets or downloaded weights. `python -m pgpc_jax.main` trains a real model.
"""

from __future__ import annotations

import os
import time

import jax
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from pgpc_jax import checkpointing, class_set, predict
from pgpc_jax.cli import parse_flags, resolve_config
from pgpc_jax.models import segmentor

FLAGS = flags.FLAGS


def run_demo(config, out_dir: str, height: int = 512, width: int = 1024) -> list[str]:
    from data_pipelines import synthetic_shift

    os.makedirs(out_dir, exist_ok=True)
    scene = synthetic_shift.synthetic_config(
        height, width, num_train=1, num_val=1, seed=config.seed
    )
    image, _ = synthetic_shift.generate_example(scene, "target", "val", 0)
    image_path = os.path.join(out_dir, "street.png")
    Image.fromarray(image).save(image_path)

    model_cfg = config.model.to_dict()
    model = segmentor.build_segmentor(model_cfg)
    start = time.time()
    variables = segmentor.init_variables(model, jax.random.key(config.seed))
    n = segmentor.count_params(variables["params"])
    print(
        f"model: MiT-{model_cfg['backbone']} + {model_cfg['head']} head, {n / 1e6:.2f} M "
        f"parameters, random init in {time.time() - start:.1f} s on {jax.devices()[0].platform}"
    )
    weights = os.path.join(out_dir, "weights")
    checkpointing.save_variables(
        weights,
        variables,
        model_cfg,
        {**class_set.meta_fields(config), "source": "random init (demo)"},
    )
    model, variables = predict.load_model(model_cfg, weights, "flax")
    written = predict.predict_files(model, variables, [image_path], out_dir, save_logits=True)
    print("wrote " + ", ".join(written))
    return written


def main(argv):
    del argv
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/gta2cs.py")
    run_demo(FLAGS.config, FLAGS.out)


def cli() -> None:
    """`python -m pgpc_jax.demo`."""
    # The default config resolves as a `--config` value does: the shipped file outside a clone.
    config_flags.DEFINE_config_file(
        "config", resolve_config("configs/gta2cs.py"), "Config of the model.", lock_config=True
    )
    flags.DEFINE_string("out", "runs/demo", "Output directory.")
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
