"""The package as a user installs it: `pip install .` into a fresh virtual environment, then its
commands from a directory that is not the clone, reading the installed copy (the shipped configs
included); and how a `--config` value that is no file resolves to a shipped config.

The fresh environment sees this environment's installed dependencies through a `.pth` file and
pip installs the project alone (`--no-deps --no-build-isolation --no-index`): nothing is
downloaded, and the build uses this environment's setuptools.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from pgpc_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pgpc_jax", "data_pipelines", "configs")
SCRIPTS = (
    "pgpc-train",
    "pgpc-predict",
    "pgpc-evaluate",
    "pgpc-convert",
    "pgpc-export",
    "pgpc-build-data",
    "pgpc-pseudo-label",
)


def _env() -> dict[str, str]:
    """The environment without this checkout on the path or pip settings of the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    return {**env, "PIP_CONFIG_FILE": os.devnull, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv directory, its python, a working directory outside the clone)."""
    tmp = tmp_path_factory.mktemp("install")
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in PACKAGES:
        shutil.copytree(
            os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps"]
    pip += ["--no-build-isolation", "--no-index", "--no-cache-dir", str(src)]
    r = subprocess.run(pip, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return str(venv), python, str(elsewhere)


def _run(args, cwd, timeout=120):
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=timeout
    )


def test_installed_copy_is_imported_with_its_configs(installed):
    """The installed packages are imported (not the clone's); a shipped config by name is the
    installed file, read by absl with its overrides through `cli.parse_flags`; each console
    script is installed and names a `cli` function."""
    venv, python, elsewhere = installed
    script = """
import json, sys
from importlib import metadata
from absl import flags
from ml_collections import config_flags
import configs, data_pipelines, pgpc_jax
from pgpc_jax import cli
config_flags.DEFINE_config_file("config", None, "", lock_config=True)
# ml_collections finds the overrides in sys.argv.
sys.argv = ["prog", "--config", "configs/gta2cs.py:daformer", "--config.seed=7"]
cli.parse_flags(sys.argv)
scripts = metadata.entry_points(group="console_scripts")
print(json.dumps(dict(
    files=[m.__file__ for m in (pgpc_jax, data_pipelines, configs)],
    shipped=cli.shipped_configs(),
    config_file=config_flags.get_config_filename(flags.FLAGS["config"]),
    method=flags.FLAGS.config.method,
    seed=flags.FLAGS.config.seed,
    scripts={e.name: e.load().__qualname__ for e in scripts if e.name.startswith("pgpc-")},
)))
"""
    r = _run([python, "-c", script], elsewhere)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    site = os.path.dirname(os.path.dirname(out["files"][0]))
    assert site.startswith(venv + os.sep)
    for file, name in zip(out["files"], PACKAGES):
        assert file == os.path.join(site, name, "__init__.py")
    expected = sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".py"))
    assert out["shipped"] == [n for n in expected if n != "__init__.py"]
    assert out["config_file"] == os.path.join(site, "configs", "gta2cs.py") + ":daformer"
    assert (out["method"], out["seed"]) == ("daformer", 7)
    assert out["scripts"] == {name: "cli" for name in SCRIPTS}
    for name in SCRIPTS:
        assert os.access(os.path.join(venv, "bin", name), os.X_OK)


def test_help_from_another_directory(installed):
    """`python -m pgpc_jax.main --help`, `pgpc-train --help` and `pgpc-export --help`: exit 0,
    the program's description and flags."""
    venv, python, elsewhere = installed
    for command, flags in (
        ([python, "-m", "pgpc_jax.main"], ("--config", "--workdir", "--num_processes")),
        ([os.path.join(venv, "bin", "pgpc-train")], ("--config", "--workdir", "--num_processes")),
        ([os.path.join(venv, "bin", "pgpc-export")], ("--workdir", "--which", "--format")),
    ):
        r = _run([*command, "--help"], elsewhere)
        assert r.returncode == 0, r.stderr
        assert "python -m pgpc_jax." in r.stdout, r.stdout  # the module's docstring
        assert all(flag in r.stdout for flag in flags), r.stdout


def test_console_script_config_by_name(installed, tmp_path):
    """`pgpc-train` outside the clone: a shipped config by name is read (an unknown override
    then lists its keys); a config that exists nowhere is one line listing the shipped ones.
    Both exit 2 and write nothing."""
    venv, python, elsewhere = installed
    train = os.path.join(venv, "bin", "pgpc-train")
    workdir = str(tmp_path / "run")
    r = _run(
        [train, "--config", "gta2cs:daformer", "--workdir", workdir, "--config.x=1"], elsewhere
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --config.x: config has no key 'x'. Valid keys: ")
    assert "uda" in r.stderr
    r = _run([train, "--config", "gta2cs_pgpc.py", "--workdir", workdir], elsewhere)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: --config=gta2cs_pgpc.py: no such file; shipped configs")
    assert "gta2cs.py" in r.stderr and "synthetic.py" in r.stderr
    assert not os.path.exists(workdir)


# ------------------------------------------------------------------------------------------------
# Resolution of --config in this checkout (no install).


def _shipped(name: str) -> str:
    return os.path.join(ROOT, "configs", name)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("gta2cs", _shipped("gta2cs.py")),
        ("gta2cs.py", _shipped("gta2cs.py")),
        ("gta2cs.py:daformer", _shipped("gta2cs.py") + ":daformer"),
        ("configs/gta2cs.py:source_only", _shipped("gta2cs.py") + ":source_only"),
        ("./configs/synthetic", _shipped("synthetic.py")),
        # Not names of shipped configs: left for the missing-file error.
        ("gta2cs_pgpc.py", "gta2cs_pgpc.py"),
        ("other/gta2cs.py", "other/gta2cs.py"),
        ("__init__.py", "__init__.py"),
        ("", ""),
    ],
)
def test_resolve_config(spec, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.resolve_config(spec) == expected


def test_a_file_in_the_working_directory_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "gta2cs.py").write_text("def get_config(): ...\n")
    assert cli.resolve_config("configs/gta2cs.py:daformer") == "configs/gta2cs.py:daformer"
    assert cli.resolve_config("gta2cs.py") == _shipped("gta2cs.py")


def test_resolve_config_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["prog", "--config", "gta2cs:daformer", "--config.seed=1", "--workdir", "gta2cs"]
    assert cli.resolve_config_argument(argv) == [
        "prog",
        "--config",
        _shipped("gta2cs.py") + ":daformer",
        "--config.seed=1",
        "--workdir",
        "gta2cs",
    ]
    assert cli.resolve_config_argument(["prog", "--config=synthetic"]) == [
        "prog",
        "--config=" + _shipped("synthetic.py"),
    ]
    assert argv[2] == "gta2cs:daformer"  # the caller's list is left as it was


def test_load_config_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.load_config("synthetic:daformer").method == "daformer"
    assert cli.load_config("configs/gta2cs.py").method == "pgpc"


def test_missing_config_lists_shipped_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text("")
    with pytest.raises(SystemExit) as raised:
        cli.parse_flags(["prog", "--config", "nosuch.py:daformer"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: --config=nosuch.py:daformer: no such file; there: mine.py; ")
    shipped = ", ".join(cli.shipped_configs())
    assert err.rstrip().endswith(
        f"shipped configs (by name, e.g. --config gta2cs.py:daformer): {shipped}"
    )
    assert "gta2cs.py" in shipped


@pytest.mark.parametrize(
    "argv, asks",
    [
        (["prog", "--help"], True),
        (["prog", "-?"], True),
        (["prog", "--config", "x.py", "--helpfull"], True),
        (["prog", "--help=false"], False),
        (["prog", "--nohelp"], False),
        (["prog", "--", "--help"], False),
        (["prog", "--workdir", "help"], False),
    ],
)
def test_asks_for_help(argv, asks):
    assert cli._asks_for_help(argv) is asks
