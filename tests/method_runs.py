"""Five steps of each method on the tiny config, and the script that records them.

The method-seam refactor changed no number: `tests/fixtures/method_runs.json` holds, for each
run below, every metric of five train steps and a checksum of each final parameter leaf,
recorded by

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.method_runs --write [--runs NAME ...]

(the tests' 8 fake devices, which change how XLA splits the CPU work)
before the refactor (a new method adds its run to RUNS and records only it); `tests/methods_test.py` runs the same five steps and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "method_runs.json")
RUNS = ("source_only", "daformer", "pgpc", "pgpc_cluda", "sepico", "fda", "fda_supcon")
STEPS = 5


def run_config(name: str):
    """The tiny config of one run: tiny MiT, 16-wide head, dropout and drop path on."""
    from configs import base, tiny
    from pgpc_jax import methods

    config = methods.configure(base.get_config(), name.split("_cluda")[0])
    config.model = tiny.get_config().model
    config.model.head_embed_dim = config.model.head_channels = 16
    config.uda.pseudo_ignore_top = 2
    config.uda.pseudo_ignore_bottom = 4
    config.uda.pseudo_threshold = 0.055  # the untrained teacher is unsure of everything
    config.num_train_steps = 20
    config.optimizer.warmup_steps = 2
    if config.method == "pgpc":
        config.pgpc.variant = "cluda" if name == "pgpc_cluda" else "pgpc"
        config.pgpc.grid = (5, 5)
        config.pgpc.num_anchors = 16
        config.pgpc.num_negatives = 32
        config.pgpc.num_unreliable = 16
        config.pgpc.reliable_threshold = 0.3
    if config.method == "sepico":
        # The contrastive terms from step 2 of 5; a narrow projection; BankCL with a bank of 3
        # that wraps within the 5 steps (the resume and sharding invariants then cover it).
        # The target batches have the source's size: the class-balanced crop keeps the image.
        config.sepico.start_step = 2
        config.sepico.channels = 16
        config.sepico.variant = "bank"
        config.sepico.bank_length = 3
    if config.method == "fda":
        # A window of b = 3 on the 32x32 crops, the entropy from step 2 of 5; the contrast
        # (fda_supcon) on 16 of the 64 projection pixels per image, 16 wide.
        config.fda.beta = 0.1
        config.fda.entropy_start_step = 2
        config.fda.contrast_samples = 16
        config.fda.contrast_channels = 16
    return config


def batches(n: int = STEPS, batch: int = 8, size: int = 32, seed: int = 0):
    """Fixed source / target batches: noise images, labels constant on each 32x32 image (so thing
    classes fill the feature distance's cells and ClassMix pastes whole regions)."""
    rng = np.random.default_rng(seed)
    label_rng = np.random.default_rng(seed + 1000)
    out = []
    for _ in range(n):
        src = {
            "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "label": np.kron(
                rng.integers(0, 19, size=(batch, size // 32, size // 32)), np.ones((1, 32, 32))
            ).astype(np.int32),
        }
        tgt = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32)}
        # Pseudo-labels of the target (read by fda_supcon only), from a stream of their own so
        # that the other draws stay as recorded: 4x4 blocks, the top quarter ignored.
        blocks = label_rng.integers(0, 19, size=(batch, size // 4, size // 4))
        tgt["label"] = np.kron(blocks, np.ones((1, 4, 4))).astype(np.int32)
        tgt["label"][:, : size // 4] = 255
        out.append((src, tgt))
    return out


def build(name: str) -> dict:
    """The run's config, model, optimizer, step function (not jitted) and state at step 0."""
    from pgpc_jax import methods
    from pgpc_jax.models import segmentor
    from pgpc_jax.train_state import create_train_state
    from pgpc_jax.train_step import make_train_step

    config = run_config(name)
    model = methods.build_model(config)
    variables = segmentor.init_variables(model, jax.random.key(0))
    optimizer = methods.make_optimizer(config, variables["params"])
    return dict(
        config=config,
        model=model,
        optimizer=optimizer,
        step_fn=make_train_step(config, model, optimizer),
        state=create_train_state(config, variables, optimizer.tx),
    )


def summary(metrics: list, state) -> dict:
    """{'metrics': [per step {name: float}], 'params': {leaf path: float64 sum}}."""
    params = {
        jax.tree_util.keystr(path): float(np.asarray(leaf, np.float64).sum())
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    }
    return {"metrics": metrics, "params": params}


def run(name: str, step=None, states: dict | None = None) -> dict:
    """The five steps of run `name` (with `step`, a jitted step of `build(name)`, if given);
    `states`, if given, receives the state after each step {step: state}."""
    built = build(name)
    step = step or jax.jit(built["step_fn"])
    state, metrics = built["state"], []
    for src, tgt in batches():
        state, m = step(state, src, tgt)
        metrics.append({k: float(v) for k, v in sorted(jax.device_get(m).items())})
        if states is not None:
            states[int(state.step)] = state
    return summary(metrics, state)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {FIXTURE}")
    parser.add_argument(
        "--runs", nargs="+", default=list(RUNS), choices=RUNS, help="runs to (re)record"
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the fixture: bit-identical or not"
    )
    args = parser.parse_args(argv)
    results = {name: run(name) for name in args.runs}
    if args.check:
        with open(FIXTURE) as f:
            recorded = json.load(f)
        for name, got in results.items():
            want = recorded[name]
            pairs = [(g[k], w[k]) for g, w in zip(got["metrics"], want["metrics"]) for k in w]
            pairs += [(got["params"][k], v) for k, v in want["params"].items()]
            worst = max(abs(g - w) / max(abs(w), 1e-12) for g, w in pairs)
            same = worst == 0 and len(got["metrics"]) == len(want["metrics"])
            print(
                f"{name}: {'bit-identical' if same else f'largest relative difference {worst:.3g}'}"
            )
        return 0
    if args.write:  # merged into the runs already recorded
        os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
        recorded = {}
        if os.path.exists(FIXTURE):
            with open(FIXTURE) as f:
                recorded = json.load(f)
        with open(FIXTURE, "w") as f:
            json.dump({**recorded, **results}, f, indent=1, sort_keys=True)
        print(f"wrote {', '.join(args.runs)} to {FIXTURE}")
    else:
        json.dump(results, sys.stdout, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
