"""Training-step time of a config, on random inputs of its crop size (no input pipeline).

Builds the model, optimizer and state exactly as `pgpc_jax.train` does, jits the step with the
same shardings and donation, then times `--steps` steps after `--warmup` (compile + 2 steps).
Several configs can be given; each is measured in turn in the same process, so their ratio is
what one run's step costs relative to another on the same device.

  python benchmarks/step_time.py --config configs/gta2cs.py:daformer --config configs/gta2cs.py
  python benchmarks/step_time.py --config configs/synthetic.py --set data.source.crop_size=128,128
  python benchmarks/step_time.py --flops --config configs/gta2cs.py:daformer --config configs/gta2cs.py
  python benchmarks/step_time.py --config configs/synthetic.py:source_only --torch fp32 --rounds 3
  python benchmarks/step_time.py --memory --config configs/gta2cs.py --set "model.remat='all'"

`--config path[:method]` is read as `python -m pgpc_jax.main --config` reads it.

`--set key=value` overrides apply to every config (python literals: 1e-3, (128, 128), 'b5').
Prints a markdown table: config, step (ours, or the PyTorch reference), warm-up s (compile and
the warm-up steps), ms/step (median over the timed steps), steps/s, peak device memory where the
backend reports it (the CPU backend reports none).

`--torch fp32[,bf16]` adds, for a source-only config, the PyTorch reference step
(`benchmarks/torch_step.py`: the original DAFormer segmentor with the same initial weights, the
same batch, the same loss and optimizer) in float32 and/or under bf16 autocast; `--rounds N`
alternates N rounds of `--steps` timed steps between our step and PyTorch's, so that a machine's
drift hits both.

`--memory` also runs nothing: it compiles the step on abstract inputs and prints XLA's memory
analysis of the program (state and batch, activations, peak), e.g. with `--set model.remat='all'`
against the default, for a shape this device cannot hold.

`--flops` runs nothing and allocates no weights: it traces the same step on abstract inputs and
prints XLA's count of floating-point operations and bytes accessed per step (the HLO before
optimisation, a multiply-add counting 2). That count is the same on every backend, so it gives
the cost of a method where its real shape does not fit or no accelerator is at hand.
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pgpc_jax import cli, methods, sharding  # noqa: E402
from pgpc_jax.models import segmentor  # noqa: E402
from pgpc_jax.train_state import create_train_state  # noqa: E402
from pgpc_jax.train_step import make_train_step  # noqa: E402


def load_config(path: str, overrides: list[str]):
    """The config of `path[:method]` with the `--set key=value` overrides applied."""
    config = cli.load_config(path)
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise SystemExit(f"--set {item}: no key {leaf!r} in {'.'.join(parents) or 'config'}")
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def random_batches(config, rng: np.random.Generator):
    src, tgt = config.data.source, config.data.target
    num_classes = config.model.num_classes

    def images(bs, crop):
        return rng.standard_normal((bs, *crop, 3)).astype(np.float32)

    labels = rng.integers(0, num_classes, (src.batch_size, *src.crop_size)).astype(np.int32)
    return (
        {"image": images(src.batch_size, tuple(src.crop_size)), "label": labels},
        {"image": images(tgt.batch_size, tuple(tgt.crop_size))},
    )


def build(config, abstract: bool = False):
    """Model, optimizer and step-0 state as `pgpc_jax.train` makes them; with `abstract`, the
    state is shapes and dtypes only (nothing allocated)."""
    model = methods.build_model(config)
    shaped = jax.eval_shape if abstract else (lambda fn, *args: fn(*args))
    variables = shaped(lambda: segmentor.init_variables(model, jax.random.key(config.seed)))
    optimizer = methods.make_optimizer(config, variables["params"])
    state = shaped(lambda v: create_train_state(config, v, optimizer.tx), variables)
    return model, optimizer, state


class JaxRunner:
    """Our jitted step of `config` on random inputs, compiled by `warmup` steps; `run(n)` times
    n more steps (seconds each)."""

    name = "jax"

    def __init__(self, config, warmup: int):
        mesh = sharding.make_mesh(config.mesh.num_devices or None)
        model, optimizer, state = build(config)
        self.variables = jax.device_get(state.student_variables)
        self.state = sharding.replicate(state, mesh)
        state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), self.state)
        batch = sharding.batch_sharding(mesh)
        self.step = jax.jit(
            make_train_step(config, model, optimizer),
            in_shardings=(state_sharding, batch, batch),
            out_shardings=(state_sharding, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        src, tgt = random_batches(config, np.random.default_rng(0))
        self.src = sharding.global_batch(src, mesh)
        self.tgt = sharding.global_batch(tgt, mesh)
        t0 = time.perf_counter()
        self.run(warmup)
        self.compile_s = time.perf_counter() - t0

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.state, metrics = self.step(self.state, self.src, self.tgt)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        values = jax.device_get(metrics).values()
        assert all(np.isfinite(float(v)) for v in values), metrics
        return times

    def peak_gib(self) -> float:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", float("nan")) / 2**30


class TorchRunner:
    """The PyTorch reference step (`torch_step.py`) of `config` with our initial weights, on the
    same random batch; `run(n)` as `JaxRunner`'s."""

    def __init__(self, config, variables, warmup: int, bf16: bool):
        import torch

        from benchmarks import torch_step

        if config.method != "source_only":
            raise SystemExit(
                f"--torch: the PyTorch reference step exists for source_only, not {config.method!r}"
            )
        self.name = "pytorch bf16" if bf16 else "pytorch"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.step = torch_step.TorchSourceOnlyStep(config, variables, bf16=bf16, device=device)
        src, _ = random_batches(config, np.random.default_rng(0))
        self.x, self.y = self.step.batch(src["image"], src["label"])
        t0 = time.perf_counter()
        self.run(warmup)
        self.compile_s = time.perf_counter() - t0

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            loss = self.step(self.x, self.y)
            self.step.synchronize()
            times.append(time.perf_counter() - t)
        assert np.isfinite(loss), loss
        return times

    def peak_gib(self) -> float:
        return self.step.peak_gib()


def measure(config, steps: int, warmup: int, torch_rows=(), rounds: int = 1) -> list[dict]:
    """Time our step of `config` and, for each of `torch_rows` ('fp32', 'bf16'), the PyTorch
    reference step on the same weights and batch: `rounds` interleaved rounds of `steps` steps
    each, after `warmup` steps. One row per runner: name, compile_s, ms (median), peak_gib."""
    runners = [JaxRunner(config, warmup)]
    for kind in torch_rows:
        runners.append(TorchRunner(config, runners[0].variables, warmup, bf16=kind == "bf16"))
    times = {id(r): [] for r in runners}
    for _ in range(rounds):
        for r in runners:
            times[id(r)] += r.run(steps)
    return [
        dict(
            name=r.name,
            compile_s=r.compile_s,
            ms=1000 * statistics.median(times[id(r)]),
            peak_gib=r.peak_gib(),
        )
        for r in runners
    ]


def count_flops(config) -> dict:
    """XLA's operation count of one training step, traced on shapes only (nothing allocated)."""
    model, optimizer, state = build(config, abstract=True)
    batches = jax.eval_shape(lambda: random_batches(config, np.random.default_rng(0)))
    lowered = jax.jit(make_train_step(config, model, optimizer)).lower(state, *batches)
    cost = lowered.cost_analysis() or {}
    if "flops" not in cost:
        raise SystemExit(f"--flops: this backend ({jax.default_backend()}) gives no cost analysis")
    return dict(gflops=cost["flops"] / 1e9, gbytes=cost.get("bytes accessed", float("nan")) / 1e9)


def memory_use(config) -> dict:
    """The compiled step's memory (GiB) from XLA's analysis of the program, on abstract inputs:
    nothing runs and nothing is allocated, so it works for shapes this device cannot hold."""
    model, optimizer, state = build(config, abstract=True)
    batches = jax.eval_shape(lambda: random_batches(config, np.random.default_rng(0)))
    step = jax.jit(make_train_step(config, model, optimizer), donate_argnums=0)
    analysis = step.lower(state, *batches).compile().memory_analysis()
    if analysis is None:
        raise SystemExit(f"--memory: this backend ({jax.default_backend()}) gives no analysis")
    gib = {
        "arguments": analysis.argument_size_in_bytes / 2**30,
        "outputs": analysis.output_size_in_bytes / 2**30,
        "aliased": analysis.alias_size_in_bytes / 2**30,
        "temp": analysis.temp_size_in_bytes / 2**30,
    }
    # Donated state is aliased to the new state: counted once.
    gib["peak"] = gib["arguments"] + gib["outputs"] - gib["aliased"] + gib["temp"]
    return gib


def _rows(paths, overrides, measure_one, summary) -> list:
    """[(path, measure_one(config))] for each config, each printed as it is done."""
    rows = []
    for path in paths:
        rows.append((path, measure_one(load_config(path, overrides))))
        print(f"{path}: {summary(rows[-1][1])}", flush=True)
    return rows


def memory_table(paths, overrides) -> list:
    rows = _rows(paths, overrides, memory_use, lambda r: f"{r['peak']:.2f} GiB")
    print(f"\nXLA memory analysis (jax {jax.__version__}, {jax.default_backend()}), ", end="")
    print(f"overrides: {overrides or 'none'}\n")
    print("| config | state + batch GiB | activations (temp) GiB | peak GiB |")
    print("|---|---|---|---|")
    for path, r in rows:
        print(f"| {path} | {r['arguments']:.2f} | {r['temp']:.2f} | {r['peak']:.2f} |")
    return rows


def flops_table(paths, overrides) -> list:
    rows = _rows(paths, overrides, count_flops, lambda r: f"{r['gflops']:.1f} GFLOP/step")
    base = rows[0][1]["gflops"]
    print(f"\nXLA cost analysis (jax {jax.__version__}), overrides: {overrides or 'none'}\n")
    print("| config | GFLOP/step | vs first | GB accessed/step |")
    print("|---|---|---|---|")
    for path, r in rows:
        print(f"| {path} | {r['gflops']:.1f} | {r['gflops'] / base:.3f}x | {r['gbytes']:.1f} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, help="config file(s)")
    parser.add_argument("--set", action="append", default=[], help="key=value override")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--flops", action="store_true", help="count operations per step instead of timing"
    )
    parser.add_argument(
        "--torch",
        default=None,
        help="also time the PyTorch reference step: fp32, bf16 or fp32,bf16 (source_only)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="print the compiled step's memory (XLA's analysis, nothing runs) instead of timing",
    )
    args = parser.parse_args(argv)
    if args.flops:
        write_json(args, "flops", flops_table(args.config, args.set))
        return
    if args.memory:
        write_json(args, "memory", memory_table(args.config, args.set))
        return
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
    torch_rows = [] if args.torch is None else args.torch.split(",")
    for kind in torch_rows:
        if kind not in ("fp32", "bf16"):
            raise SystemExit(f"--torch={args.torch}: expected fp32, bf16 or fp32,bf16")
    rows = []
    for path in args.config:
        config = load_config(path, args.set)
        for r in measure(config, args.steps, args.warmup, torch_rows, args.rounds):
            rows.append((path, r))
            print(
                f"{path} [{r['name']}]: {r['ms']:.1f} ms/step (warm-up {r['compile_s']:.1f} s)",
                flush=True,
            )
    base = rows[0][1]["ms"]
    print(f"\ndevice: {device}, jax {jax.__version__}, overrides: {args.set or 'none'}")
    print(f"{args.rounds} round(s) of {args.steps} timed steps per row, interleaved\n")
    print("| config | step | warm-up s | ms/step | steps/s | vs first | peak device GiB |")
    print("|---|---|---|---|---|---|---|")
    for path, r in rows:
        peak = "n/a" if np.isnan(r["peak_gib"]) else f"{r['peak_gib']:.2f}"
        print(
            f"| {path} | {r['name']} | {r['compile_s']:.1f} | {r['ms']:.1f} | "
            f"{1000 / r['ms']:.2f} | {r['ms'] / base:.2f}x | {peak} |"
        )
    write_json(args, "time", rows)


def write_json(args, kind: str, rows: list) -> None:
    """`--json`: {kind, device, jax, overrides, rows: [{config, ...measured values}]}."""
    if not args.json:
        return
    import json

    record = dict(
        kind=kind,
        device=f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        jax=jax.__version__,
        overrides=args.set,
        rows=[dict(config=path, **values) for path, values in rows],
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1, allow_nan=True)


if __name__ == "__main__":
    main()
