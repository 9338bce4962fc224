"""FDA end to end on the tiny embedded build, as a user runs it: two FDA models (`configs/
synthetic.py:fda`) -> `python -m pgpc_jax.pseudo_label --dataset synthetic_shift/tiny --split
target_train --weights RUN1 RUN2` (the command line, with the training run directories as
weights) -> `python -m data_pipelines.build --dataset folder --name pseudo_labels` -> one
self-training round (`:fda_sst`) and the supervised contrast (`:fda_supcon`) on that build -> the
ensemble of the self-trained model and an FDA model evaluated on the target val split; and
`benchmarks/fda_mbt.py`: its commands (`--dry-run`), its ensemble evaluation on these runs, and
the table `benchmarks/embedded_benchmark.py` prints of it."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from tiny_run import build_tiny_data

from benchmarks import embedded_benchmark, fda_mbt
from configs import tiny
from data_pipelines import build, sources
from pgpc_jax import main, pseudo_label

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "synthetic_shift/tiny"


def _config(data_dir: str, method: str, seed: int = 0):
    """`configs/synthetic.py:<method>` at test size, 2 steps (`configs/tiny.embedded_run`); the
    contrast on 16 of the 64 projection pixels of a 32x32 crop, 8 wide."""
    config = tiny.embedded_run(data_dir, 2, method=method)
    config.fda.contrast_samples = 16
    config.fda.contrast_channels = 8
    config.seed = seed
    return config


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The pipeline's runs: {name: workdir}, and the data dir; the two FDA models are laid out as
    `benchmarks/fda_mbt.py` finds them (`<root>/<name>/seed0`)."""
    root = tmp_path_factory.mktemp("fda")
    data_dir = build_tiny_data(root / "data")
    bench = root / "bench"
    found = {}
    # Two FDA models: the second with another seed (the same compiled step).
    for name, seed in (("fda_a", 0), ("fda_b", 1)):
        workdir = bench / name / "seed0"
        assert main.run(_config(data_dir, "fda", seed), str(workdir)) == 0
        found[name] = workdir

    # The pseudo-label command as a user types it: the run directories as --weights.
    out = root / "pseudo"
    command = [
        sys.executable, "-m", "pgpc_jax.pseudo_label", "--config", "configs/synthetic.py:fda",
        "--config.model.head_embed_dim=16", "--config.model.head_channels=16",
        "--weights", str(found["fda_a"]), str(found["fda_b"]),
        "--dataset", DATASET, "--split", "target_train", "--data_dir", data_dir, "--out", str(out),
    ]  # fmt: skip
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
    }
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 model(s)" in result.stdout and "% of the pixels ignored" in result.stdout

    args = ["--dataset", "folder", "--manual_dir", str(out), "--name", "pseudo_labels"]
    assert build.main([*args, "--data_dir", data_dir]) == 0

    for method in ("fda_sst", "fda_supcon"):
        config = _config(data_dir, method)
        # The recipe's target: the pseudo-labelled build (configs/base.py), at the tiny scale.
        config.data.target.dataset = "folder/pseudo_labels"
        config.data.target.split = "train"
        workdir = bench / method / "seed0"
        assert main.run(config, str(workdir)) == 0
        found[method] = workdir
    return dict(root=root, data_dir=data_dir, bench=bench, pseudo=out, runs=found)


def test_pseudo_labels_of_the_split(runs):
    out = runs["pseudo"] / "train"
    names = [f"{i:05d}.png" for i in range(12)]
    assert sorted(os.listdir(out / "images")) == sorted(os.listdir(out / "labels")) == names
    labels = np.stack([np.asarray(Image.open(out / "labels" / n)) for n in names])
    assert labels.shape == (12, 64, 128) and labels.dtype == np.uint8
    assert (labels == 255).any() and (labels < 19).any()
    assert set(np.unique(labels)) <= set(range(19)) | {255}
    summary = json.loads((runs["pseudo"] / pseudo_label.SUMMARY_FILE).read_text())
    assert summary["models"] == [str(runs["runs"]["fda_a"]), str(runs["runs"]["fda_b"])]
    assert summary["ignored_pixels"] == int((labels == 255).sum())
    # The build the rounds trained on holds these labels.
    built = sources.open_split(runs["data_dir"], "folder/pseudo_labels", "train")
    np.testing.assert_array_equal(np.stack([built[i]["label"] for i in range(12)]), labels)


def test_the_rounds_train_on_the_pseudo_labels(runs):
    for name in ("fda_a", "fda_b", "fda_sst", "fda_supcon"):
        final = json.loads((runs["runs"][name] / "final_metrics.json").read_text())
        assert 0 <= final["eval/miou"] <= 1 and "eval/miou16" in final, name
    config = json.loads((runs["runs"]["fda_sst"] / "config.json").read_text())
    assert config["data"]["target"]["dataset"] == "folder/pseudo_labels"
    assert config["fda"]["self_training"] is True
    sst = [m for m in _metrics(runs["runs"]["fda_sst"]) if "train/loss" in m]
    supcon = [m for m in _metrics(runs["runs"]["fda_supcon"]) if "train/loss" in m]
    assert [m["step"] for m in sst] == [m["step"] for m in supcon] == [1, 2]
    # The pseudo-labels reach the losses: a target cross-entropy, a contrast.
    assert all(m["train/loss_tgt"] > 0 for m in sst)
    assert all(m["train/loss_contrast"] > 0 and m["train/contrast_samples"] > 0 for m in supcon)
    assert "train/loss_contrast" not in sst[0] and "train/loss_tgt" not in supcon[0]
    plain = [m for m in _metrics(runs["runs"]["fda_a"]) if "train/loss" in m]
    assert "train/loss_tgt" not in plain[0] and "train/loss_contrast" not in plain[0]


def _ious(metrics):
    return np.array([metrics[k] for k in sorted(metrics) if k.startswith("eval/iou/")], float)


def test_ensemble_of_the_self_trained_and_an_fda_model(runs, tmp_path):
    """The ensemble evaluation of benchmarks/fda_mbt.py: one run equals the trainer's own final
    evaluation; two runs are their mean softmax, another result than either."""
    run = runs["runs"]
    final = {n: json.loads((run[n] / "final_metrics.json").read_text()) for n in run}
    alone = fda_mbt.evaluate_ensemble([str(run["fda_a"])], str(tmp_path / "alone"))
    assert alone["eval/miou"] == pytest.approx(final["fda_a"]["eval/miou"], abs=1e-6)
    np.testing.assert_allclose(_ious(alone), _ious(final["fda_a"]), atol=1e-6)

    pair = [str(run["fda_sst"]), str(run["fda_a"])]
    ensemble = fda_mbt.evaluate_ensemble(pair, str(tmp_path / "pair"))
    assert ensemble["eval/num_pixels"] == 4 * 64 * 128 and 0 <= ensemble["eval/miou"] <= 1
    written = json.loads((tmp_path / "pair" / "final_metrics.json").read_text())
    assert written["eval/miou"] == ensemble["eval/miou"] and "eval/miou13" in written
    info = json.loads((tmp_path / "pair" / "ensemble.json").read_text())
    assert info["runs"] == pair and info["split"] == "target_val"
    assert info["dataset"] == DATASET and info["data_dir"] == runs["data_dir"]
    # Another result than either member (the self-trained model differs from fda_a, its twin up
    # to the target cross-entropy, only if the pseudo-labels reach its loss).
    for member in ("fda_sst", "fda_a"):
        assert not np.allclose(_ious(ensemble), _ious(final[member]), equal_nan=True), member


def test_fda_mbt_commands_and_table(runs, tmp_path, capsys):
    """benchmarks/fda_mbt.py: --dry-run prints the stages still to run, the ensemble stage writes
    what embedded_benchmark.py tabulates, and finished stages are skipped."""
    bench, run = runs["bench"], runs["runs"]
    # A root whose FDA models are finished but nothing after them; an interrupted pseudo-label
    # folder (no summary) in it.
    fresh = tmp_path / "fresh"
    for name in ("fda_a", "fda_b"):
        os.makedirs(fresh / name)
        os.symlink(run[name], fresh / name / "seed0")
    partial = fresh / "fda_mbt" / "seed0" / "pseudo_labels"
    os.makedirs(partial / "train")
    flags = ["--seeds", "0", "--models", "fda_a", "fda_b", "--supcon", "--dry-run"]
    fda_mbt.main(["--root", str(fresh), *flags])
    printed = capsys.readouterr().out
    commands = [line[2:] for line in printed.splitlines() if line.startswith("$ ")]
    models = f"{fresh}/fda_a/seed0 {fresh}/fda_b/seed0"
    data = runs["data_dir"]
    want = [
        f"-m benchmarks.fda_mbt ensemble {models} --out {fresh}/fda_mbt/seed0 --data_dir {data}",
        f"-m pgpc_jax.pseudo_label --config configs/synthetic.py:fda --weights {models} "
        f"--dataset {DATASET} --split target_train --data_dir {data} --out {partial}",
        f"-m data_pipelines.build --dataset folder --manual_dir {partial} --name "
        f"pseudo_labels_seed0 --data_dir {data}",
        "-m pgpc_jax.main --config configs/synthetic.py:fda_sst --config.data.target.dataset="
        f"folder/pseudo_labels_seed0 --config.data.data_dir={data} --config.seed=0 --workdir "
        f"{fresh}/fda_sst/seed0",
        f"-m pgpc_jax.pseudo_label --config configs/synthetic.py:fda --weights {models} "
        f"--dataset {DATASET} --split target_train --data_dir {data} --out {partial}_styled "
        f"--style-dataset {DATASET} --style-split source_train --style-beta=0.01 --seed=0",
        f"-m data_pipelines.build --dataset folder --manual_dir {partial}_styled --name "
        f"pseudo_labels_styled_seed0 --data_dir {data}",
        "-m pgpc_jax.main --config configs/synthetic.py:fda_supcon --config.data.target.dataset="
        f"folder/pseudo_labels_styled_seed0 --config.data.data_dir={data} --config.seed=0 "
        f"--workdir {fresh}/fda_supcon/seed0",
    ]
    assert [c.split(" ", 1)[1] for c in commands] == want
    assert f"# would remove {partial} (an interrupted pseudo-label command)" in printed
    assert os.path.isdir(partial / "train")  # a dry run removes nothing

    # The fixture's root: the self-trained runs are there; seed 1 has no models.
    fda_mbt.main(["--root", str(bench), *flags[:2], "1", *flags[2:]])
    printed = capsys.readouterr().out
    assert "# fda_sst seed 0: done" in printed and "# fda_supcon seed 0: done" in printed
    assert "# seed 1: " in printed and "fda_a/seed1" in printed
    assert [line.split(" ")[4] for line in printed.splitlines() if line.startswith("$ ")] == [
        "ensemble",
        "ensemble",
    ]
    # The ensemble stage as its command runs it (here in this process), then the table.
    mbt = bench / "fda_mbt" / "seed0"
    fda_mbt.main(["ensemble", str(run["fda_a"]), str(run["fda_b"]), "--out", str(mbt)])
    miou = json.loads((mbt / "final_metrics.json").read_text())["eval/miou"]
    capsys.readouterr()
    fda_mbt.main(["--root", str(bench), *flags])
    printed = capsys.readouterr().out
    assert "# fda_mbt seed 0: done" in printed and "$ " not in printed
    rows = {
        line.split(" | ")[0][2:]: line for line in printed.splitlines() if line.startswith("| ")
    }
    assert set(rows) == {"run", "fda_a", "fda_b", "fda_mbt", "fda_sst", "fda_supcon"}
    assert rows["fda_mbt"].endswith(f"| {100 * miou:.1f} |")
    embedded_benchmark.main(["--root", str(bench), "--seeds", "0", "--table_only",
                             "--run", "fda_mbt=-"])  # fmt: skip
    assert f"| fda_mbt | 1 | {100 * miou:.2f} ± 0.00 |" in capsys.readouterr().out
