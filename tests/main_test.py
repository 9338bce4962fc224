"""`python -m pgpc_jax.main`: bad input stops with one line and exit status 2, before anything is
written (no workdir, no dataset build), and the multi-process settings are checked."""

import os
import subprocess
import sys

import pytest
from tiny_run import build_tiny_data
from tiny_run import tiny_config as _config

from configs import gta2cs
from pgpc_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("data"))


def _real_config(data_dir):
    """The GTA5 -> Cityscapes PGPC config as a user runs it, at the tiny model size."""
    config = gta2cs.get_config()
    config.data.data_dir = data_dir
    config.model.backbone = "tiny"
    config.mesh.num_devices = 1  # the global batch of 2 (the tests have 8 fake devices)
    return config


def _set(**changes):
    """A change to the tiny embedded config: {dotted key: value}."""

    def apply(config, tmp_path):
        for key, value in changes.items():
            *groups, leaf = key.split(".")
            node = config
            for group in groups:
                node = node[group]
            node[leaf] = value
        return config

    return apply


def _init_from_random_bytes(config, tmp_path):
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    config.init_from.path = str(tmp_path / "random.pth")
    config.init_from.format = "daformer"
    return config


BAD_CONFIGS = {
    "crop not a pair": (
        _set(**{"data.source.crop_size": (32,)}),
        "data.source.crop_size=(32,): expected a pair of positive integers",
    ),
    "crop larger than the scaled images": (
        _set(**{"data.target.crop_size": (32, 500)}),
        "data.target.crop_size=(32, 500) (height, width) is larger than the target images",
    ),
    "unknown backbone": (_set(**{"model.backbone": "b9"}), "model.backbone='b9': expected one of"),
    "unknown remat": (_set(**{"model.remat": "encoder"}), "model.remat='encoder': expected one of"),
    "negative prefetch": (
        _set(**{"data.prefetch": -1}),
        "data.prefetch=-1: expected an int >= 0",
    ),
    "unknown pgpc variant": (
        _set(**{"pgpc.variant": "pgcp"}),
        "pgpc.variant='pgcp': expected one of",
    ),
    "unknown method": (_set(**{"method": "dac"}), "method='dac': expected one of"),
    "method changed by an override": (
        _set(**{"method": "daformer"}),
        "method='daformer' but the config has the 'pgpc' group",
    ),
    "learning rate nan": (
        _set(**{"optimizer.learning_rate": float("nan")}),
        "optimizer.learning_rate=nan: expected a positive finite number",
    ),
    "learning rate zero": (
        _set(**{"optimizer.learning_rate": 0.0}),
        "optimizer.learning_rate=0.0: expected a positive finite number",
    ),
    "learning rate negative": (
        _set(**{"optimizer.learning_rate": -6e-5}),
        "optimizer.learning_rate=-6e-05: expected a positive finite number",
    ),
    "a split the build lacks": (
        _set(**{"data.val.split": "validation"}),
        "data.val.split='validation': ",
    ),
    "a .pth of random bytes": (_init_from_random_bytes, "is not a PyTorch checkpoint"),
    "batch not divisible by the devices": (
        _set(**{"mesh.num_devices": 2, "data.source.batch_size": 3}),
        "data.source.batch_size=3 (global) does not divide over 2 devices",
    ),
}


def _run(config, workdir, capsys):
    status = main.run(config, str(workdir))
    err = capsys.readouterr().err.strip().splitlines()
    return status, err


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_values_stop_with_one_line_and_write_nothing(case, data_dir, tmp_path, capsys):
    change, expected = BAD_CONFIGS[case]
    config = change(_config(data_dir, 4), tmp_path)
    status, err = _run(config, tmp_path / "run", capsys)
    assert status == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_split_error_lists_the_splits_there_are(data_dir, tmp_path, capsys):
    config = _set(**{"data.val.split": "validation"})(_config(data_dir, 4), tmp_path)
    _, err = _run(config, tmp_path / "run", capsys)
    assert "not 'validation'" in err[0] and "'target_val'" in err[0]


def test_a_workdir_that_cannot_be_created(data_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    status, err = _run(_config(data_dir, 4), tmp_path / "file" / "run", capsys)
    assert status == 2 and len(err) == 1
    assert err[0].startswith(f"error: --workdir={tmp_path / 'file' / 'run'} cannot be created")


def test_an_empty_data_dir_says_how_to_build_the_dataset(tmp_path, capsys):
    empty = tmp_path / "tfds"
    empty.mkdir()
    config = _real_config(str(empty))
    config.init_from.path = ""
    status, err = _run(config, tmp_path / "run", capsys)
    assert status == 2 and len(err) == 1
    assert "data.source.dataset='gta5/daformer': no built dataset" in err[0]
    assert f"the data_dir {empty} is empty" in err[0]
    assert (
        f"python -m data_pipelines.build --dataset gta5 --manual_dir <your GTA5 download> "
        f"--data_dir {empty} --resize daformer" in err[0]
    )
    assert not (tmp_path / "run").exists() and os.listdir(empty) == []


def test_missing_imagenet_weights_say_where_to_get_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pretrained/ here
    status, err = _run(_real_config(str(tmp_path)), tmp_path / "run", capsys)
    assert status == 2 and len(err) == 1
    assert "init_from.path='pretrained/mit_b5.pth' does not exist" in err[0]
    assert "NVlabs SegFormer" in err[0] and "nvidia/mit-b5" in err[0]
    assert not (tmp_path / "run").exists()


def _cli(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "pgpc_jax.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        timeout=120,
    )


def test_cli_config_file_that_does_not_exist(tmp_path):
    r = _cli("--config", "configs/gta2cs_pgpc.py", "--workdir", str(tmp_path / "run"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: --config=configs/gta2cs_pgpc.py: no such file; there: ")
    assert "gta2cs.py" in r.stderr and not (tmp_path / "run").exists()


def test_cli_method_argument(tmp_path):
    """`--config FILE.py:METHOD`: an unknown method, and an override of another method's group,
    are one line each (exit 2) and write nothing."""
    r = _cli("--config", "configs/synthetic.py:no_such_method", "--workdir", str(tmp_path / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(
        "error: --config=configs/synthetic.py:no_such_method: method='no_such_method': expected "
        "one of source_only, daformer, pgpc, sepico"
    )
    r = _cli(
        "--config",
        "configs/synthetic.py:daformer",
        "--config.pgpc.variant=cluda",
        "--workdir",
        str(tmp_path / "run"),
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: --config.pgpc.variant: config has no key 'pgpc'")
    assert not (tmp_path / "run").exists()


def test_cli_print_config_prints_the_resolved_config_and_exits(tmp_path):
    """--print_config: the file's config for its method, with the overrides, and nothing run
    (no workdir needed)."""
    r = _cli("--config", "configs/gta2cs.py:daformer", "--config.seed=7", "--print_config")
    assert r.returncode == 0, r.stderr
    printed = yaml_like(r.stdout)
    assert printed["method"] == "daformer" and printed["seed"] == "7"
    assert "pgpc:" not in r.stdout  # daformer's config has no pgpc group
    assert "data:" in r.stdout and "data_dir:" in r.stdout


def yaml_like(text: str) -> dict[str, str]:
    """The top-level `key: value` lines of a printed ConfigDict."""
    return dict(
        line.split(": ", 1) for line in text.splitlines() if ": " in line and line[0] != " "
    )


def test_cli_incomplete_multi_process_settings(tmp_path):
    r = _cli(
        "--config",
        "configs/synthetic.py",
        "--workdir",
        str(tmp_path / "run"),
        JAX_COORDINATOR_ADDRESS="localhost:12355",
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(
        "error: --coordinator_address given without --num_processes and --process_id"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, environ, expected",
    [
        ((None, None, None), {}, None),
        (("h:1", 2, 1), {}, dict(coordinator_address="h:1", num_processes=2, process_id=1)),
        (
            (None, None, None),
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
            dict(coordinator_address="h:1", num_processes=4, process_id=3),
        ),
        ((None, None, None), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {}),
        ((None, None, None), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
        ((None, None, None), {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
        ((None, None, None), {"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ],
)
def test_distributed_settings(flags, environ, expected):
    assert main.distributed_settings(*flags, environ) == expected


@pytest.mark.parametrize(
    "flags, environ, message",
    [
        ((None, 2, None), {}, "--num_processes given without --coordinator_address and"),
        (("h:1", 2, 2), {}, "--process_id=2 with --num_processes=2"),
        ((None, None, None), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
    ],
)
def test_distributed_settings_errors(flags, environ, message):
    with pytest.raises(main.DistributedSetupError, match=message):
        main.distributed_settings(*flags, environ)
