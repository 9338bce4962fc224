"""Your own domain pair: a `folder` build, its class set taken from the data, with the method as
the config's argument (default PGPC) and the build's name as `data.folder`:

  python -m data_pipelines.build --dataset folder --source my/source --target my/target \
      --target_val my/target_val --classes my/classes.json --name my_pair --data_dir data
  python -m pgpc_jax.main --config configs/folder.py:daformer --workdir runs/my_pair \
      --config.data.folder=my_pair
  python -m pgpc_jax.main --config configs/folder.py:sepico --workdir runs/my_pair_sepico \
      --config.data.folder=my_pair --config.init_from.path=pretrained/mit_b5.pth

`configs/folder.py:METHOD,cpu` trains at the embedded benchmark's CPU size instead (a tiny MiT
from random weights, 128x128 crops, 600 steps: minutes on a laptop), to try the path first.

The build has the splits `source_train` (labelled), `target_train` (unlabelled) and `target_val`
(labelled, the validation set); a build made with `--resize WxH` is named `<name>_WxH`. The
model's classes are the build's (`classes = 'data'`, `model.num_classes = 0`: the count of the
class file), filled in at start-up and kept in the run's config.json; the evaluation table,
TensorBoard tags, colour predictions and exported checkpoints use the class file's names and
colours. Everything else is the DAFormer recipe of configs/base.py (MiT-B5 + DAFormer head from
ImageNet MiT-B5, 512x512 crops, 40k iterations) with what is specific to Cityscapes turned off:
  * images at the size they were built (`--resize` of the build), no rescaling;
  * no rows without pseudo-labels (Cityscapes' rectification border and ego car);
  * no ImageNet feature distance (it runs on Cityscapes' thing classes; list your own thing
    classes' indices in `uda.fd_classes` and set `uda.fd_lambda=0.005` to turn it on).
Flips and DACS' colour jitter and blur stay on; `configs/base.py` says when to turn them off.
"""

import ml_collections

from configs import base, synthetic
from pgpc_jax import methods


def benchmark_config(folder: str = "default"):
    """The recipe on the build `folder/<folder>` before a method is chosen."""
    config = base.get_config()
    config.init_from.path = "pretrained/mit_b5.pth"
    config.classes = "data"
    config.model.num_classes = 0

    data = config.data
    # The build's name (`--name`); every split below follows an override of it.
    data.folder = ml_collections.FieldReference(folder)
    splits = (
        (data.source, "source_train"),
        (data.target, "target_train"),
        (data.val, "target_val"),
    )
    for group, split in splits:
        # A reference of its own per split: overriding one split's dataset (a recipe's
        # pseudo-labelled target) leaves the others following data.folder.
        group.dataset = "folder/" + data.get_ref("folder")
        group.split = split
        group.scale = ()

    config.uda.pseudo_ignore_top = 0
    config.uda.pseudo_ignore_bottom = 0
    config.uda.fd_lambda = 0.0
    config.uda.fd_classes = ()
    return config


def get_config(argument: str | None = None):
    """`METHOD` (default PGPC) or `METHOD,cpu` (the embedded benchmark's CPU size)."""
    method, _, size = (argument or "").partition(",")
    if size not in ("", "cpu"):
        raise ValueError(
            f"configs/folder.py:{argument}: expected METHOD or METHOD,cpu after the colon"
        )
    config = methods.configure(benchmark_config(), method or None)
    if size == "cpu":
        synthetic.cpu_sized_method(synthetic.cpu_sized(config))
    return base.with_pseudo_label_target(config)
