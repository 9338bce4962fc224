"""benchmarks/step_time.py: the operation count of a step (its timing is a benchmark, not a test)."""

import pytest

from benchmarks import step_time

SMALL = ["data.source.crop_size=(64, 64)", "data.target.crop_size=(64, 64)"]


def _flops(path, extra=()):
    return step_time.count_flops(step_time.load_config(path, SMALL + list(extra)))


def test_flops_grow_with_the_method_and_the_batch():
    daformer = _flops("configs/synthetic.py:daformer")
    pgpc = _flops("configs/synthetic.py")
    source_only = _flops("configs/synthetic.py:source_only")
    assert source_only["gflops"] < daformer["gflops"] < pgpc["gflops"]
    # The contrast adds a loss on embeddings the step already computes, not a forward pass.
    assert pgpc["gflops"] < 1.5 * daformer["gflops"]
    double = _flops(
        "configs/synthetic.py:daformer", ["data.source.batch_size=4", "data.target.batch_size=4"]
    )
    assert double["gflops"] == pytest.approx(2 * daformer["gflops"], rel=0.05)


def test_flops_table_prints_the_ratio(capsys):
    step_time.main(
        ["--flops", "--config", "configs/synthetic.py:daformer", "--config", "configs/synthetic.py"]
        + [arg for item in SMALL for arg in ("--set", item)]
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| configs/")]
    assert len(rows) == 2 and rows[0].split("|")[3].strip() == "1.000x"
    assert float(rows[1].split("|")[3].strip()[:-1]) > 1.0


def test_mistyped_override_names_the_key():
    with pytest.raises(SystemExit, match="no key 'crop_sise' in data.source"):
        step_time.load_config("configs/synthetic.py", ["data.source.crop_sise=(64, 64)"])
