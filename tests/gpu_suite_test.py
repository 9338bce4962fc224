"""benchmarks/gpu_suite.sh runs end to end at a CPU test size (`--tiny`), so the command a GPU
session runs cannot rot: every part is measured and lands in the suite's JSON and markdown."""

import json
import os
import subprocess
import sys


def test_gpu_suite_runs_every_part_at_tiny_size(tmp_path):
    out = tmp_path / "suite"
    # One device, as on a one-GPU machine (not the test session's 8 fake CPU devices: the suite's
    # batches of 2 would not split over 8).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, XLA_FLAGS=" ".join(flags))
    result = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    parts = json.loads((out / "gpu_suite.json").read_text())
    assert sorted(parts) == [
        "memory_all",
        "memory_none",
        "methods_bf16",
        "methods_fp32",
        "torch_side_by_side",
        "train_3_steps",
    ]
    side = parts["torch_side_by_side"]["rows"]
    assert [r["name"] for r in side] == ["jax", "pytorch", "pytorch bf16"]
    assert all(r["ms"] > 0 for r in side)
    bf16 = parts["methods_bf16"]
    assert "model.dtype='bfloat16'" in bf16["overrides"] and len(bf16["rows"]) == 1
    none, every = parts["memory_none"]["rows"][0], parts["memory_all"]["rows"][0]
    assert none["temp"] > 0 and every["temp"] > 0 and every["arguments"] == none["arguments"]
    table = (out / "gpu_suite.md").read_text()
    assert "== input_pipeline" in table and "| workers |" in table and "FAILED" not in table
