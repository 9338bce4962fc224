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
METRICS = ("eval/miou", "eval/miou16", "eval/miou13")


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

    print(f"\n| run | seeds | {' | '.join(m.split('/')[1] for m in METRICS)} | per seed (mIoU) |")
    print("|---|---|" + "---|" * len(METRICS) + "---|")
    for name, _ in rows:
        results = [read(os.path.join(args.root, name, f"seed{s}")) for s in args.seeds]
        results = [r for r in results if r is not None]
        if not results:
            continue
        cells = []
        for m in METRICS:
            v = 100 * np.array([r[m] for r in results])
            cells.append(f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}")
        per_seed = ", ".join(f"{100 * r['eval/miou']:.1f}" for r in results)
        print(f"| {name} | {len(results)} | {' | '.join(cells)} | {per_seed} |")


if __name__ == "__main__":
    main()
