"""kill -9 at random steps, then the same command again: is the resumed run bit-identical?

  python benchmarks/kill_resume.py --root runs/kill_resume --trials 20 --steps 12

Runs `python -m pgpc_jax.main` as a user would (the embedded PGPC config at test size,
`tiny_runs.py`): once without interruption, then `--trials` times with SIGKILL sent at a random moment
(after a random training step was printed, so kills land in the step, in the logging, in an
asynchronous checkpoint write or in the evaluation), restarting the same command until it
exits 0, sometimes killing it again. Each finished trial must equal the uninterrupted run bit for
bit: the final TrainState (every leaf), both data iterators' positions, and the logged training
metrics, each step exactly once. Prints one row per trial and a summary; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import tiny_runs  # noqa: E402


def _run_until_step(cmd, env, kill_after: int | None, delay: float) -> tuple[int, int | None]:
    """Run `cmd`; SIGKILL it `delay` seconds after it printed training step `kill_after`.

    Returns (exit code, the last training step it printed)."""
    proc = subprocess.Popen(
        cmd,
        cwd=tiny_runs.ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    last = None
    for line in proc.stdout:
        if line.startswith("step ") and "/" in line.split()[1]:
            last = int(line.split()[1].split("/")[0])
            if kill_after is not None and last >= kill_after:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    return proc.returncode, last


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/kill_resume", help="where runs and data go")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = parser.parse_args(argv)

    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)
    config_file = tiny_runs.prepare(root, args.steps)
    env = tiny_runs.env(1, cache_dir=os.path.join(root, "jax_cache"))

    reference = os.path.join(root, "uninterrupted")
    if not os.path.exists(os.path.join(reference, "final_metrics.json")):
        code, _ = _run_until_step(tiny_runs.command(config_file, reference), env, None, 0.0)
        if code:
            print(f"the uninterrupted run failed (exit {code})")
            return 1
    want = tiny_runs.finished_run(reference)

    rng = random.Random(args.seed)
    failures = 0
    print("| trial | killed after steps | launches | bit-identical state | positions | logs |")
    print("|---:|---|---:|---|---|---|")
    for trial in range(args.trials):
        workdir = os.path.join(root, f"trial_{trial:02d}")
        kills, launches = [], 0
        while True:
            # Up to two kills per trial; a kill lands 0-0.3 s after a printed step.
            kill_after = rng.randint(1, args.steps) if len(kills) < 2 else None
            if kills and rng.random() < 0.5:
                kill_after = None
            code, last = _run_until_step(
                tiny_runs.command(config_file, workdir), env, kill_after, rng.uniform(0.0, 0.3)
            )
            launches += 1
            if kill_after is not None and code == -signal.SIGKILL:
                kills.append(last)
                continue
            if code != 0:
                print(f"| {trial} | {kills} | {launches} | run failed (exit {code}) | | |")
                failures += 1
                break
            got = tiny_runs.finished_run(workdir)
            same_state = len(got[0]) == len(want[0]) and all(
                a.dtype == b.dtype and a.shape == b.shape and (a == b).all()
                for a, b in zip(got[0], want[0])
            )
            same_positions = got[1] == want[1]
            same_logs = got[2] == want[2] and got[3] == sorted(set(got[3])) and got[4] == want[4]
            ok = same_state and same_positions and same_logs
            failures += not ok
            print(
                f"| {trial} | {kills or '-'} | {launches} | {'yes' if same_state else 'NO'} | "
                f"{'yes' if same_positions else 'NO'} | {'yes' if same_logs else 'NO'} |",
                flush=True,
            )
            break
    print(f"\n{args.trials - failures}/{args.trials} trials bit-identical to the uninterrupted run")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
