"""Five steps of each method on the tiny config, and the script that records them.

The method-seam refactor changed no number: `tests/fixtures/method_runs.json` holds, for each
run below, every metric of five train steps and a checksum of each final parameter leaf,
recorded by

  python -m tests.method_runs --write

before the refactor; `tests/methods_test.py` runs the same five steps and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "method_runs.json")
RUNS = ("source_only", "daformer", "pgpc", "pgpc_cluda")
STEPS = 5


def run_config(name: str):
    """The tiny config of one run: tiny MiT, 16-wide head, dropout and drop path on."""
    from configs import base, tiny

    config = base.get_config()
    config.model = tiny.get_config().model
    config.model.head_embed_dim = config.model.head_channels = 16
    config.uda.pseudo_ignore_top = 2
    config.uda.pseudo_ignore_bottom = 4
    config.uda.pseudo_threshold = 0.055  # the untrained teacher is unsure of everything
    config.num_train_steps = 20
    config.optimizer.warmup_steps = 2
    if name == "source_only":
        config.uda.method = "source_only"
        config.uda.fd_lambda = 0.0
    if name.startswith("pgpc"):
        base.use_pgpc(config)
        config.contrast.variant = "cluda" if name == "pgpc_cluda" else "pgpc"
        config.contrast.grid = (5, 5)
        config.contrast.num_anchors = 16
        config.contrast.num_negatives = 32
        config.contrast.num_unreliable = 16
        config.contrast.reliable_threshold = 0.3
    return config


def batches(n: int = STEPS, batch: int = 2, size: int = 64, seed: int = 0):
    """Fixed source / target batches: noise images, labels constant on 32x32 blocks (so thing
    classes fill the feature distance's cells and ClassMix pastes whole regions)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        src = {
            "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "label": np.kron(
                rng.integers(0, 19, size=(batch, size // 32, size // 32)), np.ones((1, 32, 32))
            ).astype(np.int32),
        }
        tgt = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32)}
        out.append((src, tgt))
    return out


def run(name: str) -> dict:
    """{'metrics': [per step {name: float}], 'params': {leaf path: float64 sum}}."""
    from pgpc_jax import optim
    from pgpc_jax.models import segmentor
    from pgpc_jax.train_state import create_train_state
    from pgpc_jax.train_step import make_train_step

    config = run_config(name)
    model = segmentor.build_segmentor(config.model)
    variables = segmentor.init_variables(model, jax.random.key(0))
    tx = optim.make_optimizer(variables["params"], config.num_train_steps, **config.optimizer)
    state = create_train_state(config, variables, tx)
    step = jax.jit(make_train_step(config, model, tx))
    metrics = []
    for src, tgt in batches():
        state, m = step(state, src, tgt)
        metrics.append({k: float(v) for k, v in sorted(jax.device_get(m).items())})
    params = {
        jax.tree_util.keystr(path): float(np.asarray(leaf, np.float64).sum())
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    }
    return {"metrics": metrics, "params": params}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {FIXTURE}")
    args = parser.parse_args(argv)
    results = {name: run(name) for name in RUNS}
    if args.write:
        os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
        with open(FIXTURE, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        print(f"wrote {FIXTURE}")
    else:
        json.dump(results, sys.stdout, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
