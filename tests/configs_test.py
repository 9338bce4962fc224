"""Every config in configs/ loads, validates, and builds its model, optimizer and train state
abstractly (no weights allocated, so MiT-B5 costs nothing)."""

import glob
import importlib
import os

import jax
import pytest

from pgpc_jax import optim
from pgpc_jax.models import segmentor
from pgpc_jax.train_state import create_train_state
from pgpc_jax.train_step import make_train_step

ROOT = os.path.join(os.path.dirname(__file__), "..")
NAMES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith("_")
)


def test_all_configs_are_listed():
    assert {"base", "gta2cs", "synthia2cs", "cs2darkzurich", "synthetic", "tiny"} <= set(NAMES)
    for name in ("gta2cs", "synthia2cs", "cs2darkzurich", "synthetic"):
        assert f"{name}_daformer" in NAMES and f"{name}_source_only" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_abstractly(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    model = segmentor.build_segmentor(config.model)
    abstract = segmentor.abstract_variables(model)
    tx = optim.make_optimizer(abstract["params"], config.num_train_steps, **config.optimizer)
    state = jax.eval_shape(lambda v: create_train_state(config, v, tx), abstract)
    make_train_step(config, model, tx)  # validates the uda / contrast settings
    assert (state.prototypes is not None) == (config.contrast.variant == "pgpc")
    if name.endswith("source_only"):
        assert config.uda.method == "source_only" and config.contrast.variant == "none"


def test_pgpc_configs_are_the_released_setting():
    from configs import gta2cs, gta2cs_daformer

    pgpc, daformer = gta2cs.get_config(), gta2cs_daformer.get_config()
    assert pgpc.contrast.variant == "pgpc" and daformer.contrast.variant == "none"
    assert pgpc.uda.target_weight == 0.8 and daformer.uda.target_weight == 1.0
    assert pgpc.num_train_steps == 60_000 and daformer.num_train_steps == 40_000
    assert tuple(pgpc.contrast.grid) == (65, 65)
    # Nothing else differs: the model is exactly DAFormer's.
    assert pgpc.model.to_dict() == daformer.model.to_dict()
    assert pgpc.optimizer.to_dict() == daformer.optimizer.to_dict()
