"""launch/colab.ipynb, executed end to end as Colab runs it (cell by cell in an IPython kernel),
at the notebook's `tiny` size and a few steps: build, train, plots, export, evaluation of the
export, whose mIoU the notebook asserts equal to the run's. And the repository's copy carries no
outputs.

The kernel is this environment's Python (a kernelspec written to a temporary JUPYTER_PATH);
Jupyter's, IPython's and matplotlib's files go to temporary folders, not the home directory.
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import nbclient
import nbformat
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")
STEPS = 2


def _cell(nb, text: str):
    """The one code cell whose source contains `text`."""
    found = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
    assert len(found) == 1, f"{len(found)} code cells contain {text!r}"
    return found[0]


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def _kernel_environment(tmp_path, monkeypatch) -> None:
    """A python3 kernelspec of this interpreter, the notebook's settings, and every per-user
    folder under tmp_path (the kernel inherits this environment)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    settings = {
        "JUPYTER_PATH": str(tmp_path / "jupyter"),
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter_data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter_runtime"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter_config"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "MPLCONFIGDIR": str(tmp_path / "matplotlib"),
        "PGPC_NOTEBOOK_STEPS": str(STEPS),
        "PGPC_NOTEBOOK_SIZE": "tiny",
        # The code of this checkout, on one CPU device (not the tests' 8), with the tests'
        # persistent compilation cache.
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": "",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": os.path.abspath(jax.config.jax_compilation_cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)


def test_the_notebook_runs_end_to_end(tmp_path, monkeypatch):
    """Every cell runs without an error in a fresh working directory; the training cell shows the
    progress line, the curve and prediction cells show figures, the export is a DAFormer
    checkpoint, and the notebook's own check (export mIoU = run mIoU) ran and holds."""
    _kernel_environment(tmp_path, monkeypatch)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cwd = tmp_path / "colab"
    cwd.mkdir()
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error

    work = cwd / "pgpc_colab"
    train_text = _text(_cell(nb, '"pgpc_jax.main"'))
    progress = rf"step {STEPS}/{STEPS}\s+loss \S+.*steps/s\s+ETA"
    assert re.search(progress, train_text), train_text[-2000:]
    assert f"evaluation at step {STEPS}" in train_text
    # Quiet by default: the trainer's own lines, no library INFO logs (orbax logs each
    # checkpoint action at INFO) and no XLA slow-compile alarm, the compile said in one line.
    assert re.search(r"compiling the step of pgpc \.\.\.\ncompiled in \d", train_text)
    info_lines = [line for line in train_text.splitlines() if re.match(r"I\d{4} ", line)]
    assert not info_lines, info_lines[:5]
    assert "orbax" not in train_text and "Very slow compile" not in train_text
    assert _images(_cell(nb, "metrics.jsonl")) == 1
    assert _images(_cell(nb, "_pred.png")) == 1
    state_dict = torch.load(work / "pgpc_synthetic.pth", weights_only=True)["state_dict"]
    assert any(k.startswith("model.decode_head.") for k in state_dict)
    assert any(k.startswith("ema_model.") for k in state_dict)

    records = [json.loads(line) for line in open(work / "run" / "metrics.jsonl")]
    run_miou = [r["eval/miou"] for r in records if "eval/miou" in r]
    assert len(run_miou) >= 2  # the mIoU curve has a line
    export_metrics = json.loads((work / "eval_export" / "metrics.json").read_text())
    assert export_metrics["weights_format"] == "daformer"
    assert abs(export_metrics["metrics"]["eval/miou"] - run_miou[-1]) <= 1e-6
    check = _text(_cell(nb, "EXPORT_MIOU - RUN_MIOU"))
    assert f"= run mIoU {100 * run_miou[-1]:.3f}" in check


def test_the_repository_copy_has_no_outputs():
    """The committed notebook is stripped: no outputs, no execution counts."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    assert [c.outputs for c in code] == [[]] * len(code)
    assert [c.execution_count for c in code] == [None] * len(code)
