"""Two processes x 4 CPU devices against one process x 8 devices: the same training run?

  python benchmarks/two_processes.py --root runs/two_processes --steps 8

Runs the embedded PGPC config at test size (`tiny_runs.py`, a global batch of 8: one image per
device) as a user would, `python -m pgpc_jax.main`, once as one process with 8 CPU devices and
once as two processes on localhost (`--coordinator_address localhost:PORT --num_processes 2
--process_id i`) with 4 each. Prints the training losses of both step by step, the largest
relative difference of every logged training metric, the largest difference of any state leaf
after the last step, the evaluation of both, and the wall times (compile included).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import tiny_runs  # noqa: E402


def _run(cmds: list[list[str]], env: dict) -> float:
    """Start every command, wait for all; returns the wall time (raises if one fails)."""
    start = time.time()
    procs = [
        subprocess.Popen(
            cmd,
            cwd=tiny_runs.ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for cmd in cmds
    ]
    errors = [p.communicate()[1] for p in procs]
    for proc, err in zip(procs, errors):
        if proc.returncode:
            raise SystemExit(f"a run failed (exit {proc.returncode}):\n{err[-3000:]}")
    return time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/two_processes")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    config_file = tiny_runs.prepare(root, args.steps, batch_size=8, num_devices=0)

    single, double = os.path.join(root, "one_process"), os.path.join(root, "two_processes")
    # No persistent compilation cache: both sides compile (and the two processes in step).
    one = _run([tiny_runs.command(config_file, single)], tiny_runs.env(8))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    flags = ["--coordinator_address", address, "--num_processes", "2", "--process_id"]
    two = _run(
        [tiny_runs.command(config_file, double, *flags, str(i)) for i in range(2)],
        tiny_runs.env(4),
    )
    a = tiny_runs.finished_run(single)
    b = tiny_runs.finished_run(double)

    print("| step | loss, 1 process x 8 | loss, 2 processes x 4 | relative difference |")
    print("|---:|---:|---:|---:|")
    for step in sorted(a[2]):
        x, y = a[2][step]["train/loss"], b[2][step]["train/loss"]
        print(f"| {step} | {x:.7f} | {y:.7f} | {abs(x - y) / abs(x):.1e} |")
    worst = {}
    for step in a[2]:
        for key, x in a[2][step].items():
            y = b[2][step][key]
            if x is not None and y is not None:
                diff = abs(x - y) / max(abs(x), 1e-12)
                worst[key] = max(worst.get(key, 0.0), diff)
    print("\nlargest relative difference over the steps, per logged training metric:")
    for key, value in sorted(worst.items()):
        print(f"  {key}: {value:.1e}")
    state_diff = max(
        float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
        for x, y in zip(a[0], b[0])
    )
    print(f"\nlargest |difference| of a state leaf after step {args.steps}: {state_diff:.1e}")
    print(f"logged training steps: {a[3]} (1 process), {b[3]} (2 processes)")
    for name, run in (("1 process x 8", a), ("2 processes x 4", b)):
        ev = run[4][-1]
        print(f"{name}: eval/miou {ev['eval/miou']:.6f} at step {ev['step']}")
    print(f"wall time, compile included: {one:.0f} s (1 process), {two:.0f} s (2 processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
