"""The persistent compilation cache of `python -m pgpc_jax.main` (`--compile_cache`): on by
default for one process, kept when the caller configured one, written by a first run and read by
a repeated one (its programs all found: nothing new is written)."""

import os
import subprocess
import sys

import jax
from tiny_run import build_tiny_data

from pgpc_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_folder():
    assert main.default_compile_cache({"XDG_CACHE_HOME": "/x"}) == "/x/pgpc_jax/xla"
    home = os.path.expanduser("~")
    assert main.default_compile_cache({}) == os.path.join(home, ".cache", "pgpc_jax", "xla")


def test_a_configured_cache_is_kept(tmp_path):
    configured = jax.config.jax_compilation_cache_dir  # tests/conftest.py's
    assert configured and main.use_compile_cache(str(tmp_path)) == configured
    assert jax.config.jax_compilation_cache_dir == configured


def _train(config_file: str, workdir: str, cache: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgpc_jax.main",
            "--config",
            config_file,
            "--workdir",
            workdir,
            f"--compile_cache={cache}",
        ],  # fmt: skip
        cwd=ROOT,
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_a_repeated_run_reads_its_compiled_step(tmp_path):
    data_dir = build_tiny_data(tmp_path / "data")
    config_file = tmp_path / "one_step.py"
    config_file.write_text(
        "from configs import tiny\n\n\n"
        "def get_config():\n"
        f"    return tiny.embedded_run({str(data_dir)!r}, 1, method='source_only')\n"
    )
    cache = tmp_path / "cache"
    out = _train(str(config_file), str(tmp_path / "first"), str(cache))
    assert f"compilation cache: {cache}" in out
    written = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert written  # the step took more than the 1 s threshold to compile
    # The same config in another workdir: every program is found, none written again.
    _train(str(config_file), str(tmp_path / "second"), str(cache))
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == written
