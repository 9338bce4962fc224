"""FDA's multi-band transfer (MBT) and one self-training round on the embedded benchmark, per seed.

Given the three FDA models of `benchmarks/embedded_benchmark.py` (one per beta, per seed):

  python benchmarks/embedded_benchmark.py --root runs/bench --seeds 0 1 2 \\
      --run "fda_b0.01=configs/synthetic.py:fda --config.fda.beta=0.01" \\
      --run "fda_b0.05=configs/synthetic.py:fda --config.fda.beta=0.05" \\
      --run "fda_b0.09=configs/synthetic.py:fda --config.fda.beta=0.09"
  python benchmarks/fda_mbt.py --root runs/bench --seeds 0 1 2 [--supcon] [--dry-run]

for each seed k, with M = <root>/fda_b0.01/seed<k>, <root>/fda_b0.05/seed<k>, <root>/fda_b0.09/seed<k>
(`--models`):
  1. fda_mbt: the ensemble of M (the mean of their softmax, `evaluation.ensemble_probabilities`)
     on the runs' validation split, as the trainer evaluates (the first run's config.json: its
     `data.val` dataset, split, scale and batch size, `eval` mode) ->
     <root>/fda_mbt/seed<k>/final_metrics.json, the trainer's format (scalars, NaN as null), so
     `embedded_benchmark.py --table_only --run fda_mbt=-` tabulates it; ensemble.json there names
     the runs. Run as `python -m benchmarks.fda_mbt ensemble RUN... --out DIR` in a process of its
     own (a parent holding an accelerator would starve the training processes).
  2. pseudo-labels of the runs' target training split (`data.target`, e.g.
     synthetic_shift/default target_train) by M at the runs' test size (`data.val.scale` applied
     to the split's first image: 256x128 on the default build) -> <root>/fda_mbt/seed<k>/
     pseudo_labels (`python -m pgpc_jax.pseudo_label --dataset ... --split ...`);
  3. their folder build `folder/pseudo_labels_seed<k>` in the runs' data dir;
  4. fda_sst: `--config configs/synthetic.py:fda_sst
     --config.data.target.dataset=folder/pseudo_labels_seed<k> --config.seed=k` ->
     <root>/fda_sst/seed<k>.
With --supcon, also (the fifth seed's stage 1 and 2, `fda_supcon` [reconstructed]):
  5. pseudo-labels of the target images styled to the source (`--style-dataset` = the runs'
     `data.source` split, `--style-beta` --style_beta, `--seed` k, --grayscale if given) by M ->
     <root>/fda_mbt/seed<k>/pseudo_labels_styled;
  6. `folder/pseudo_labels_styled_seed<k>`;
  7. fda_supcon: `configs/synthetic.py:fda_supcon` on it -> <root>/fda_supcon/seed<k>.
Then the markdown table of embedded_benchmark.py for the FDA models and these rows.

Rerunnable: a stage whose output exists is skipped (a run's final_metrics.json; for a seed whose
fda_sst / fda_supcon run is finished, its pseudo-labels and build too); a pseudo-label folder
without its summary (an interrupted command) is removed and made again, and then the build of it
is made again; an interrupted training run resumes from its checkpoints. `--dry-run` prints the
commands the stages would run and runs nothing. `--extra="--config.k=v ..."` adds overrides to
the pseudo-label commands and the training runs (e.g. the model size of other runs); --data_dir
overrides the runs' `data.data_dir`. Commands run from the repository root, each logging to
`<its output>/stdout.log`; a failure stops the script with that log's path.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python benchmarks/fda_mbt.py`
MODELS = ("fda_b0.01", "fda_b0.05", "fda_b0.09")
FINAL = "final_metrics.json"
SUMMARY = "pseudo_label_summary.json"  # pgpc_jax.pseudo_label.SUMMARY_FILE


def done(workdir: str) -> bool:
    """A finished run (or ensemble evaluation): its final_metrics.json exists."""
    return os.path.isfile(os.path.join(workdir, FINAL))


def in_root(path: str) -> str:
    """A path of a run's config (relative to the trainer's working directory, the repository
    root) as an absolute path."""
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def read_config(run: str) -> dict:
    """A run's config.json."""
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------
# Stage 1: the ensemble evaluation (in a process of its own).


def evaluate_ensemble(runs: Sequence[str], out: str, data_dir: str | None = None) -> dict:
    """The mean-softmax ensemble of training runs on the validation split of the first one.

    Args:
      runs: run directories of the same model (their latest checkpoints; the students).
      out: folder for final_metrics.json (the trainer's format) and ensemble.json.
      data_dir: where the validation split is built; None: the first run's `data.data_dir`.

    Returns:
      The metrics of `evaluation.evaluate` (eval/miou, eval/miou16, eval/miou13, eval/iou/*,
      eval/num_pixels).
    """
    import numpy as np

    from data_pipelines import pipeline, sources
    from pgpc_jax import evaluation, metrics_logging, weights

    config = weights.read_run_config(runs[0])
    model, variables = weights.load_models(config.model, list(runs))
    data_dir = in_root(data_dir or config.data.data_dir)
    val_cfg = config.data.val
    val = sources.open_split(data_dir, val_cfg.dataset, val_cfg.split)
    batches = pipeline.val_dataset(
        val,
        batch_size=int(val_cfg.batch_size),
        scale=tuple(val_cfg.scale) if val_cfg.scale else None,
    )
    metrics, table = evaluation.evaluate(
        model,
        variables if len(variables) > 1 else variables[0],
        iter(batches),
        int(config.model.num_classes),
        mode=config.eval.mode,
        crop_size=tuple(config.eval.crop_size),
        stride=tuple(config.eval.stride),
        class_weights=evaluation.class_weights_of(config),
    )
    print(f"ensemble of {len(runs)} run(s) on {val_cfg.dataset} {val_cfg.split}:\n{table}")
    os.makedirs(out, exist_ok=True)
    info = {
        "runs": [os.path.abspath(r) for r in runs],
        "data_dir": data_dir,
        "dataset": val_cfg.dataset,
        "split": val_cfg.split,
        "model_weights": "1/N",
    }
    with open(os.path.join(out, "ensemble.json"), "w") as f:
        f.write(json.dumps(info, indent=2) + "\n")
    final = {k: float(v) for k, v in metrics.items() if np.isscalar(v)}
    with open(os.path.join(out, FINAL), "w") as f:  # written last: the stage's "done" mark
        f.write(metrics_logging.strict_json(final, indent=2))
    return metrics


def ensemble_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fda_mbt ensemble", description=evaluate_ensemble.__doc__
    )
    parser.add_argument("runs", nargs="+", help="training run directories")
    parser.add_argument("--out", required=True, help="folder of final_metrics.json")
    parser.add_argument("--data_dir", help="default: the first run's data.data_dir")
    args = parser.parse_args(argv)
    evaluate_ensemble(args.runs, args.out, args.data_dir)


# ------------------------------------------------------------------------------------------------
# The stages' commands.


def network_size(config: dict, data_dir: str) -> str | None:
    """`W,H` of the runs' test size (`data.val.scale` applied to the first target training
    image), None when the runs test at the images' own size."""
    scale = config["data"]["val"]["scale"]
    if not scale:
        return None
    from data_pipelines import sources, transforms

    target = config["data"]["target"]
    first = sources.open_split(data_dir, target["dataset"], target["split"], False)[0]
    height, width = first["image"].shape[:2]
    w, h = transforms.rescale_size(width, height, tuple(scale))
    return f"{w},{h}"


def pseudo_label_command(
    config_file: str,
    models: Sequence[str],
    config: dict,
    data_dir: str,
    out: str,
    resize: str | None,
    extra: Sequence[str],
    style: dict | None = None,
) -> list[str]:
    """`python -m pgpc_jax.pseudo_label` of the runs' target training split by `models`;
    `style`: {'beta', 'seed', 'grayscale'} to style the target to the runs' source split."""
    target = config["data"]["target"]
    cmd = [
        sys.executable, "-m", "pgpc_jax.pseudo_label", "--config", config_file, *extra,
        "--weights", *models, "--dataset", target["dataset"], "--split", target["split"],
        "--data_dir", data_dir, "--out", out,
    ]  # fmt: skip
    if resize:
        cmd += ["--resize", resize]
    if style is not None:
        source = config["data"]["source"]
        cmd += [
            "--style-dataset", source["dataset"], "--style-split", source["split"],
            f"--style-beta={style['beta']}", f"--seed={style['seed']}",
        ]  # fmt: skip
        if style["grayscale"]:
            cmd.append("--grayscale")
    return cmd


def build_command(manual_dir: str, name: str, data_dir: str) -> list[str]:
    """The folder build of a pseudo-label output as `folder/<name>`."""
    return [
        sys.executable, "-m", "data_pipelines.build", "--dataset", "folder",
        "--manual_dir", manual_dir, "--name", name, "--data_dir", data_dir,
    ]  # fmt: skip


def train_command(
    config_arg: str, dataset: str, seed: int, workdir: str, data_dir: str, extra: Sequence[str]
) -> list[str]:
    """A training run on a pseudo-label build, as embedded_benchmark.py runs its rows."""
    return [
        sys.executable, "-m", "pgpc_jax.main", "--config", config_arg,
        f"--config.data.target.dataset={dataset}", f"--config.data.data_dir={data_dir}",
        f"--config.seed={seed}", "--workdir", workdir, *extra,
    ]  # fmt: skip


def ensemble_command(models: Sequence[str], out: str, data_dir: str) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.fda_mbt", "ensemble", *models,
        "--out", out, "--data_dir", data_dir,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The script.


class Runner:
    """Runs commands from the repository root, logging to a file (or, dry, prints them)."""

    def __init__(self, dry: bool):
        self.dry = dry

    def note(self, message: str) -> None:
        print(f"# {message}", flush=True)

    def remove(self, path: str, why: str) -> None:
        self.note(f"{'would remove' if self.dry else 'removing'} {path} ({why})")
        if not self.dry:
            shutil.rmtree(path)

    def __call__(self, cmd: list[str], log_dir: str) -> None:
        print("$", shlex.join(cmd), flush=True)
        if self.dry:
            return
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(log_dir, "stdout.log")
        t0 = time.time()
        with open(log_path, "a") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            raise SystemExit(f"exit status {rc}: {shlex.join(cmd)}; see {log_path}")
        self.note(f"done in {time.time() - t0:.0f} s")


def built(data_dir: str, name: str) -> str | None:
    """The folder of a finished build of `folder/<name>`, or None."""
    found = glob.glob(os.path.join(data_dir, "folder", name, "*", "dataset_info.json"))
    return os.path.join(data_dir, "folder", name) if found else None


def self_training_round(
    run: Runner,
    args: argparse.Namespace,
    seed: int,
    kind: str,
    models: list[str],
    config: dict,
    data_dir: str,
    resize: str | None,
) -> None:
    """Stages 2-4 (kind 'sst') or 5-7 ('supcon') of one seed."""
    workdir = os.path.join(args.root, f"fda_{kind}", f"seed{seed}")
    if done(workdir):
        run.note(f"fda_{kind} seed {seed}: done ({workdir})")
        return
    suffix = "" if kind == "sst" else "_styled"
    labels_dir = os.path.join(args.root, "fda_mbt", f"seed{seed}", f"pseudo_labels{suffix}")
    name = f"pseudo_labels{suffix}_seed{seed}"
    extra = shlex.split(args.extra)
    fresh = False
    if not os.path.isfile(os.path.join(labels_dir, SUMMARY)):
        if os.path.exists(labels_dir):
            run.remove(labels_dir, "an interrupted pseudo-label command")
        style = None
        if kind == "supcon":
            style = dict(beta=args.style_beta, seed=seed, grayscale=args.grayscale)
        cmd = pseudo_label_command(
            f"{args.config}:fda", models, config, data_dir, labels_dir, resize, extra, style
        )
        run(cmd, os.path.dirname(labels_dir))
        fresh = True
    existing = built(data_dir, name)
    if fresh and existing:
        run.remove(existing, "a build of earlier pseudo-labels")
    run(build_command(labels_dir, name, data_dir), os.path.dirname(labels_dir))
    cmd = train_command(
        f"{args.config}:fda_{kind}", f"folder/{name}", seed, workdir, data_dir, extra
    )
    run(cmd, workdir)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ensemble"]:
        ensemble_main(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="directory of the benchmark's runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), help="the FDA runs (<root>/<name>/seed<k>)"
    )
    parser.add_argument("--config", default="configs/synthetic.py", help="the benchmark's config")
    parser.add_argument("--data_dir", help="default: the first FDA run's data.data_dir")
    parser.add_argument("--supcon", action="store_true", help="also the fda_supcon stages")
    parser.add_argument("--style_beta", type=float, default=0.01, help="--supcon's styling")
    parser.add_argument("--grayscale", action="store_true", help="--supcon: grayscale inputs")
    parser.add_argument("--extra", default="", help="overrides of every config")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    args = parser.parse_args(argv)
    args.root = os.path.abspath(args.root)
    run = Runner(args.dry_run)

    for seed in args.seeds:
        models = [os.path.join(args.root, name, f"seed{seed}") for name in args.models]
        missing = [m for m in models if not done(m)]
        if missing:
            message = (
                f"seed {seed}: {', '.join(missing)} not finished (no {FINAL}); train the FDA "
                "models first (benchmarks/embedded_benchmark.py, see this script's docstring)"
            )
            if not run.dry:
                raise SystemExit(message)
            run.note(message)
        # Their config (a dry run takes it from any of them that has started).
        started = [m for m in models if os.path.isfile(os.path.join(m, "config.json"))]
        config = read_config(started[0]) if started else None
        if args.data_dir:
            data_dir = os.path.abspath(args.data_dir)
        elif config is not None:
            data_dir = in_root(config["data"]["data_dir"])
        else:
            data_dir = os.path.join(ROOT, "data")
        mbt = os.path.join(args.root, "fda_mbt", f"seed{seed}")
        if done(mbt):
            run.note(f"fda_mbt seed {seed}: done ({mbt})")
        else:
            run(ensemble_command(models, mbt, data_dir), mbt)
        if config is None:  # a dry run before the models: the rest needs their config
            run.note(f"seed {seed}: the pseudo-label and training commands need the FDA runs")
            continue
        resize = network_size(config, data_dir)
        for kind in ("sst", "supcon") if args.supcon else ("sst",):
            self_training_round(run, args, seed, kind, models, config, data_dir, resize)

    rows = [*args.models, "fda_mbt", "fda_sst"] + (["fda_supcon"] if args.supcon else [])
    from benchmarks import embedded_benchmark

    table_args = ["--root", args.root, "--seeds", *map(str, args.seeds), "--table_only"]
    embedded_benchmark.main(table_args + [arg for row in rows for arg in ("--run", f"{row}=-")])


if __name__ == "__main__":
    main()
