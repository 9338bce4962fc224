"""The methods other than PGPC (whose end-to-end runs are in tests/train_resume_test.py and
tests/real_configs_test.py) through the command a user runs, on the tiny embedded build; a SePiCo
run exported in SePiCo's layout."""

import json

import jax
import numpy as np
import pytest
import torch
from tiny_run import build_tiny_data

from configs import tiny
from pgpc_jax import export, main


# SePiCo runs the command in its own test below (its export layout is its own).
@pytest.mark.parametrize("method", ["source_only", "daformer"])
def test_the_other_methods_run_end_to_end(method, tmp_path, capsys):
    """`python -m pgpc_jax.main --config configs/synthetic.py:<method>` on the tiny embedded
    build (`main.run`, what the command calls): trains, evaluates, checkpoints, resumes as done,
    and its DAFormer export holds the student, and the teacher only where the method has one."""

    config = tiny.embedded_run(build_tiny_data(tmp_path / "data"), 2, method=method)
    workdir = str(tmp_path / "run")
    assert main.run(config, workdir) == 0
    assert "evaluation at step 2" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    trained = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in trained] == [1, 2]
    assert ("train/loss_mix" in trained[0]) == (method == "daformer")
    export.export_run(workdir, "daformer", str(tmp_path / "run.pth"))
    keys = torch.load(tmp_path / "run.pth", weights_only=True)["state_dict"].keys()
    assert any(k.startswith("model.") for k in keys)
    assert any(k.startswith("ema_model.") for k in keys) == (method == "daformer")
    assert main.run(config, workdir) == 0  # done: resumes at step 2 and evaluates
    assert "resumed from" in capsys.readouterr().out


def test_a_sepico_run_exports_in_sepicos_layout(tmp_path, capsys):
    """`configs/synthetic.py:sepico` through the command (the whole target cut by the
    class-balanced crop on device), then `python -m pgpc_jax.export --format sepico`: SePiCo's
    own layout, with the projection head as `auxiliary_head.*` under `model.` and `ema_model.`,
    reads back (`convert to-flax --format sepico`) to the run's student, head included."""
    from pgpc_jax import convert, methods, weights

    config = tiny.embedded_run(build_tiny_data(tmp_path / "data"), 2, method="sepico")
    workdir = str(tmp_path / "run")
    assert main.run(config, workdir) == 0
    assert "evaluation at step 2" in capsys.readouterr().out
    out = str(tmp_path / "sepico.pth")
    lines = export.export_run(workdir, "sepico", out)
    assert lines[0].startswith(f"wrote {out}: SePiCo checkpoint, model. = student, ema_model.")
    keys = torch.load(out, weights_only=True)["state_dict"].keys()
    for prefix in ("model.", "ema_model."):
        assert f"{prefix}auxiliary_head.convs.0.conv.weight" in keys
        assert f"{prefix}auxiliary_head.convs.1.bn.running_var" in keys
    heads = methods.get("sepico").auxiliary_heads(config)
    back, _ = convert.to_flax(out, "sepico", config.model.to_dict(), auxiliary_heads=heads)
    _, state, _ = weights.load_run(workdir)
    student = weights.run_variables(state, "model")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(student), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
