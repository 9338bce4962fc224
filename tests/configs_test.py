"""Every benchmark config × every method loads, validates, and builds its model, optimizer and
train state abstractly (no weights allocated, so MiT-B5 costs nothing)."""

import glob
import os

import jax
import pytest

from configs import base, cs2darkzurich, folder, gta2cs, synthetic, synthia2cs, tiny
from pgpc_jax import cli, methods
from pgpc_jax.config_checks import ConfigError, _check_method
from pgpc_jax.models import segmentor
from pgpc_jax.train_state import create_train_state
from pgpc_jax.train_step import make_train_step

ROOT = os.path.join(os.path.dirname(__file__), "..")
# The methods with a config group (and a method state) of their own.
GROUPS = ("pgpc", "sepico", "fda")
WITH_STATE = ("pgpc", "sepico")
BENCHMARKS = {
    "gta2cs": gta2cs,
    "synthia2cs": synthia2cs,
    "cs2darkzurich": cs2darkzurich,
    "synthetic": synthetic,
    "folder": folder,
}


def test_one_config_file_per_benchmark():
    names = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert names == {"__init__", "base", "tiny", *BENCHMARKS}


@pytest.mark.parametrize("method", sorted(methods.METHODS))
@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
def test_config_builds_abstractly(benchmark, method):
    config = BENCHMARKS[benchmark].get_config(method)
    assert config.method == method
    if config.model.num_classes == 0:  # configs/folder.py: the data's count, filled in at start-up
        config.model.num_classes = 5
    _check_method(config)
    model = methods.build_model(config)
    abstract = segmentor.abstract_variables(model)
    optimizer = methods.make_optimizer(config, abstract["params"])
    state = jax.eval_shape(lambda v: create_train_state(config, v, optimizer.tx), abstract)
    make_train_step(config, model, optimizer)  # validates the method's settings
    module = methods.get(method)
    assert (state.teacher_params is None) == (not module.needs_teacher(config))
    assert (state.method_state is not None) == (method in WITH_STATE)
    # Each method owns its group; no other method's group is present.
    assert [m for m in methods.METHODS if m in config] == ([method] if method in GROUPS else [])


@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
def test_the_config_file_argument_picks_the_method(benchmark):
    """`--config configs/X.py` is PGPC; `configs/X.py:daformer` is DAFormer (cli.load_config
    reads the argument as `--config` does)."""
    path = os.path.join(ROOT, "configs", f"{benchmark}.py")
    assert cli.load_config(path).method == "pgpc"
    assert cli.load_config(f"{path}:daformer").method == "daformer"
    with pytest.raises(ValueError, match="method='dacs': expected one of source_only, daformer"):
        cli.load_config(f"{path}:dacs")


def test_pgpc_configs_are_the_released_setting():
    pgpc, daformer = gta2cs.get_config(), gta2cs.get_config("daformer")
    assert pgpc.pgpc.variant == "pgpc" and "pgpc" not in daformer
    assert pgpc.uda.target_weight == 0.8 and daformer.uda.target_weight == 1.0
    assert pgpc.num_train_steps == 60_000 and daformer.num_train_steps == 40_000
    assert tuple(pgpc.pgpc.grid) == (65, 65)
    # Nothing else differs: the model is exactly DAFormer's.
    assert pgpc.model.to_dict() == daformer.model.to_dict()
    assert pgpc.optimizer.to_dict() == daformer.optimizer.to_dict()
    so = gta2cs.get_config("source_only")
    assert so.uda.fd_lambda == 0.0 and so.num_train_steps == 40_000


def test_a_method_changed_by_override_is_refused():
    config = synthetic.get_config()
    config.method = "daformer"  # what --config.method=daformer on configs/synthetic.py does
    with pytest.raises(ConfigError, match="has the 'pgpc' group: the method was changed"):
        _check_method(config)
    config = methods.configure(base.get_config(), "daformer")
    config.method = "no_such_method"
    with pytest.raises(ConfigError, match="method='no_such_method': expected one of"):
        _check_method(config)


def test_sepico_configs_are_the_released_setting():
    """SePiCo on GTA -> Cityscapes: DistCL from step 3000, 40k steps, seed 76, no feature
    distance, 640x640 source crops and the whole 1280x640 target; the embedded benchmark scales
    the start to its 600 steps and takes its whole 128x256 target."""
    config = gta2cs.get_config("sepico")
    c = config.sepico
    assert (c.variant, c.start_step, c.temperature, c.bank_length) == ("dist", 3000, 100.0, 200)
    assert (c.class_balanced_crop, c.regen_pseudo, c.channels) == (True, True, 512)
    assert (config.num_train_steps, config.seed, config.uda.fd_lambda) == (40_000, 76, 0.0)
    assert tuple(config.data.source.crop_size) == (640, 640)
    assert tuple(config.data.target.crop_size) == (640, 1280)
    assert tuple(config.data.target.scale) == tuple(config.data.val.scale) == (1280, 640)
    assert synthia2cs.get_config("sepico").num_train_steps == 40_000
    embedded = synthetic.get_config("sepico")
    assert embedded.sepico.start_step == 45
    assert tuple(embedded.data.target.crop_size) == (128, 256)
    assert tuple(embedded.data.source.crop_size) == (128, 128)


def test_tiny_config_is_a_tiny_model():
    assert tiny.get_config().model.backbone == "tiny"


def test_folder_config_takes_its_dataset_and_classes_from_the_build():
    """`configs/folder.py:METHOD[,cpu]`: one override names the build for every split; the class
    set is the data's; `,cpu` is the embedded benchmark's size; a bad argument is a ValueError
    (one line from the command)."""
    path = os.path.join(ROOT, "configs", "folder.py")
    config = cli.load_config(f"{path}:sepico")
    config.data.folder = "my_pair"  # what --config.data.folder=my_pair does
    assert {g.dataset for g in (config.data.source, config.data.target, config.data.val)} == {
        "folder/my_pair"
    }
    assert (config.data.source.split, config.data.target.split, config.data.val.split) == (
        "source_train",
        "target_train",
        "target_val",
    )
    assert (config.classes, config.model.num_classes, config.uda.fd_lambda) == ("data", 0, 0.0)
    assert config.model.backbone == "b5" and config.init_from.path == "pretrained/mit_b5.pth"
    cpu = cli.load_config(f"{path}:daformer,cpu")
    small = synthetic.get_config("daformer")
    assert cpu.model.to_dict() == {**small.model.to_dict(), "num_classes": 0}
    assert cpu.num_train_steps == small.num_train_steps and cpu.init_from.path == ""
    with pytest.raises(ValueError, match="expected METHOD or METHOD,cpu"):
        cli.load_config(f"{path}:daformer,gpu")
    # A recipe's pseudo-labelled target: source and val still follow data.folder.
    sst = cli.load_config(f"{path}:fda_sst")
    sst.data.folder = "my_pair"
    assert sst.data.target.dataset == "folder/pseudo_labels"
    assert sst.data.source.dataset == sst.data.val.dataset == "folder/my_pair"
    sst.data.val.dataset = "folder/other"
    assert sst.data.source.dataset == "folder/my_pair"
