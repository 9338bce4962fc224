"""The methods other than PGPC (whose end-to-end runs are in tests/train_resume_test.py and
tests/real_configs_test.py) through the command a user runs, on the tiny embedded build."""

import json

import pytest
import torch
from tiny_run import build_tiny_data

from configs import tiny
from pgpc_jax import export, main


# SePiCo is left out to save a compile in CI: the command runs the same generic step, whose
# SePiCo invariants (resume, sharding, one trace) are in tests/methods_test.py.
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
