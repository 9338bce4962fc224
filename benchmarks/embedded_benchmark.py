"""Target mIoU on the embedded benchmark: methods x seeds, mean +- std, as a markdown table.

Each run is `python -m pgpc_jax.main --config <config> --workdir <root>/<name>/seed<k>
--config.seed=<k> [overrides]`, one after the other; a run whose final_metrics.json exists is not
repeated (and an interrupted one resumes), so the command can be re-run until the table is full.

  python benchmarks/embedded_benchmark.py --root runs/bench --seeds 0 1 2 \
      --run source_only=configs/synthetic.py:source_only \
      --run daformer=configs/synthetic.py:daformer \
      --run pgpc=configs/synthetic.py:pgpc \
      --run "cluda=configs/synthetic.py:pgpc --config.pgpc.variant=cluda"

`--run NAME=CONFIG[:METHOD] [--config.key=value ...]` names a row (NAME ends at the first
`=`); `--extra="--config.k=v ..."` (with the `=`) adds overrides to every run, e.g. a dataset
built elsewhere: `--extra=--config.data.data_dir=/tmp/tfds`; `--table_only` prints what exists.
The table has a column per mean the runs report (mIoU; mIoU16 and mIoU13 for the 19 Cityscapes
classes) and, with `--per_class`, one per class IoU, named by the runs' classes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# The means first, in this order when a run has them (mIoU16 / mIoU13: the 19 Cityscapes classes).
MEANS = ("eval/miou", "eval/miou16", "eval/miou13")


def metric_columns(results: dict[str, list[dict]], per_class: bool = False) -> list[str]:
    """The metrics the runs have, in table order: the means (`eval/miou*`), then, with
    `per_class`, each class's IoU (`eval/iou/<name>`) in the order the runs list them."""
    keys = list(dict.fromkeys(k for runs in results.values() for r in runs for k in r))
    means = [k for k in MEANS if k in keys] + [
        k for k in keys if k.startswith("eval/miou") and k not in MEANS
    ]
    return means + ([k for k in keys if k.startswith("eval/iou/")] if per_class else [])


def table(results: dict[str, list[dict]], per_class: bool = False) -> str:
    """Markdown table: a row per run name (its seeds' final metrics), mean ± std (in %) of every
    column of `metric_columns`; '-' where a row's runs lack the metric."""
    columns = metric_columns(results, per_class)
    titles = [c.removeprefix("eval/").removeprefix("iou/").replace("_", " ") for c in columns]
    lines = [
        f"| run | seeds | {' | '.join(titles)} | per seed (mIoU) |",
        "|---|---|" + "---|" * len(columns) + "---|",
    ]
    for name, runs in results.items():
        if not runs:
            continue
        cells = []
        for column in columns:
            values = [r[column] for r in runs if r.get(column) is not None]
            if len(values) < len(runs):
                cells.append("-")
                continue
            v = 100 * np.array(values, np.float64)
            cells.append(f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}")
        per_seed = ", ".join(f"{100 * r['eval/miou']:.1f}" for r in runs)
        lines.append(f"| {name} | {len(runs)} | {' | '.join(cells)} | {per_seed} |")
    return "\n".join(lines)


def run_one(config_args: list[str], workdir: str, seed: int, extra: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "pgpc_jax.main",
        "--config",
        *config_args[:1],
        *config_args[1:],
        f"--config.seed={seed}",
        "--workdir",
        workdir,
        *extra,
    ]
    os.makedirs(workdir, exist_ok=True)
    print("$", shlex.join(cmd), flush=True)
    t0 = time.time()
    with open(os.path.join(workdir, "stdout.log"), "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"run failed with exit code {rc}; see {workdir}/stdout.log")
    return time.time() - t0


def read(workdir: str) -> dict | None:
    path = os.path.join(workdir, "final_metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="directory of the runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run", action="append", required=True, help="NAME=CONFIG [overrides]")
    parser.add_argument("--extra", default="", help="overrides added to every run")
    parser.add_argument("--table_only", action="store_true")
    parser.add_argument(
        "--per_class", action="store_true", help="also a column per class IoU (eval/iou/*)"
    )
    args = parser.parse_args(argv)
    rows = []
    for spec in args.run:
        name, _, rest = spec.partition("=")
        if not rest:
            raise SystemExit(f"--run {spec!r}: expected NAME=CONFIG [overrides]")
        rows.append((name, shlex.split(rest)))

    for name, config_args in rows:
        for seed in args.seeds:
            workdir = os.path.join(args.root, name, f"seed{seed}")
            if args.table_only or read(workdir) is not None:
                continue
            seconds = run_one(config_args, workdir, seed, shlex.split(args.extra))
            result = read(workdir)
            print(f"{name} seed {seed}: mIoU {100 * result['eval/miou']:.2f} ({seconds:.0f} s)")

    results = {
        name: [r for s in args.seeds if (r := read(os.path.join(args.root, name, f"seed{s}")))]
        for name, _ in rows
    }
    print("\n" + table(results, args.per_class))


if __name__ == "__main__":
    main()
