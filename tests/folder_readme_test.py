"""The README's "Your own data" example, run as a user runs it: every command of its block as its
own process, in a fresh directory, with only sizes made smaller (fewer and smaller images, 2
training steps). Generate a 5-class pair -> build it -> train `configs/folder.py:daformer,cpu` ->
evaluate the run -> export it; the class names reach the build summary, the evaluation tables,
final_metrics.json and the exported checkpoint (read back by PyTorch as DAFormer's tools/test.py
reads it, same logits). Then the embedded benchmark's table of such runs."""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_segmentor

from benchmarks import embedded_benchmark
from data_pipelines import folder_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = list(folder_example.GROUPS)

# What the test adds to each command of the README (sizes only).
SMALLER = {
    "data_pipelines.folder_example": ["--num_train", "4", "--num_val", "2", "--size", "96x64"],
    "pgpc_jax.main": [
        "--config.num_train_steps=2",
        "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2",
        "--config.log_every_steps=1",
        "--config.data.source.crop_size=64,64",
        "--config.data.target.crop_size=64,64",
        "--config.data.val.batch_size=2",
        "--config.data.source.rcs_min_pixels=20",
        "--config.eval.num_visualizations=1",
    ],
}


def readme_commands() -> list[list[str]]:
    """The commands of the first bash block under the README's "## Your own data"."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Your own data", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def _run(command: list[str], cwd: str) -> subprocess.CompletedProcess:
    assert command[:2] == ["python", "-m"], command
    module = command[2]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, *command[1:], *SMALLER.get(module, [])],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, f"{shlex.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Runs the README block in a fresh directory; {module: its stdout}, and the directory."""
    cwd = str(tmp_path_factory.mktemp("user"))
    commands = readme_commands()
    assert [c[2] for c in commands] == [
        "data_pipelines.folder_example",
        "data_pipelines.build",
        "pgpc_jax.main",
        "pgpc_jax.evaluate",
        "pgpc_jax.export",
    ]
    outputs = {c[2]: _run(c, cwd).stdout for c in commands}
    return cwd, outputs


def test_build_summary_names_the_classes(readme_run):
    _, out = readme_run
    build = out["data_pipelines.build"]
    assert "dataset folder/my_pair" in build
    target = build.split("target_train:", 1)[1].split("target_val:", 1)[0]
    assert "no labels" in target and "classes seen" not in target
    assert "ground" in build.split("source_train:", 1)[1]


def test_training_uses_the_data_class_set(readme_run):
    cwd, out = readme_run
    train = out["pgpc_jax.main"]
    table = train.split("evaluation at step 2:", 1)[1]
    assert all(f"| {name} " in table for name in NAMES)
    assert "mIoU16" not in table and "class_0" not in table
    run = os.path.join(cwd, "runs", "my_pair")
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["model"]["num_classes"] == 5 and config["class_names"] == NAMES
    assert config["class_colors"] == [list(c) for c in folder_example.COLORS]
    final = json.load(open(os.path.join(run, "final_metrics.json")))
    assert {f"eval/iou/{name}" for name in NAMES} <= set(final)
    assert "eval/miou16" not in final and np.isfinite(final["eval/miou"])
    # The colour prediction is in the class file's colours (black: ignored pixels only).
    from PIL import Image

    label = np.asarray(
        Image.open(os.path.join(run, "predictions", "step_000002", "0000_label.png"))
    )
    colours = {tuple(c) for c in label.reshape(-1, 3)}
    assert colours <= {*folder_example.COLORS, (0, 0, 0)} and len(colours) > 1


def test_evaluate_and_export_carry_the_class_set(readme_run):
    cwd, out = readme_run
    table = out["pgpc_jax.evaluate"]
    assert all(f"| {name} " in table for name in NAMES) and "mIoU16" not in table
    metrics = json.load(open(os.path.join(cwd, "runs", "my_pair", "eval", "metrics.json")))
    assert {f"eval/iou/{name}" for name in NAMES} <= set(metrics["metrics"])
    assert "eval/miou16" not in metrics["metrics"]

    # The export: DAFormer's layout with the class file's names and colours, our logits in torch.
    path = os.path.join(cwd, "my_pair.pth")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert list(saved["meta"]["CLASSES"]) == NAMES
    assert [list(c) for c in saved["meta"]["PALETTE"]] == [list(c) for c in folder_example.COLORS]
    error = torch_segmentor.run_export_error(path, os.path.join(cwd, "runs", "my_pair"))
    assert error < 1e-5, error


def test_benchmark_table_of_a_five_class_run(readme_run, tmp_path, capsys):
    """`embedded_benchmark.py` tabulates the metrics the runs have: mIoU and (--per_class) the
    five classes by name; no mIoU16 / mIoU13 column."""
    cwd, _ = readme_run
    final = json.load(open(os.path.join(cwd, "runs", "my_pair", "final_metrics.json")))
    for seed, shift in ((0, 0.0), (1, 0.01)):
        run = tmp_path / "bench" / "mine" / f"seed{seed}"
        run.mkdir(parents=True)
        shifted = {k: v + shift if k.startswith("eval/miou") else v for k, v in final.items()}
        (run / "final_metrics.json").write_text(json.dumps(shifted))
    embedded_benchmark.main(
        [
            "--root",
            str(tmp_path / "bench"),
            "--seeds",
            "0",
            "1",
            "--table_only",
            "--per_class",
            "--run",
            "mine=configs/folder.py:daformer,cpu",
        ]  # fmt: skip
    )
    lines = capsys.readouterr().out.strip().splitlines()
    header, row = lines[-3], lines[-1]
    assert header.startswith("| run | seeds | miou | ") and "miou16" not in header
    assert all(f" {name} |" in header for name in NAMES)
    miou = 100 * (final["eval/miou"] + 0.005)
    assert row.startswith(f"| mine | 2 | {miou:.2f} ± ")
