"""Entry point: `python -m pgpc_jax.main --config configs/X.py --workdir DIR [--config.key=value ...]`.

Starts `jax.distributed` on multi-process runs (TPU pods, SLURM / multi-node GPU: see
`launch/`), logs the devices and versions, builds the embedded dataset if the config uses it and
it is absent, and hands over to `train.train_and_evaluate`. Re-running the same command resumes
from the workdir's last checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pgpc_jax.cli import parse_flags

FLAGS = flags.FLAGS
EMBEDDED = "synthetic_shift"


def _maybe_start_distributed() -> None:
    """`jax.distributed.initialize()` when launched as one process of many (a TPU pod slice, or
    a launcher that sets the coordinator variables); single-process runs skip it."""
    import jax

    multi = any(
        v in os.environ
        for v in (
            "JAX_COORDINATOR_ADDRESS",
            "SLURM_NTASKS",
            "TPU_WORKER_HOSTNAMES",
            "MEGASCALE_COORDINATOR_ADDRESS",
        )
    )
    if multi and os.environ.get("SLURM_NTASKS", "2") != "1":
        jax.distributed.initialize()


def _ensure_embedded_dataset(config) -> None:
    """Build the embedded domain-shift dataset on first use (a minute or two on a CPU)."""
    from data_pipelines import build, sources

    names = {config.data.source.dataset, config.data.target.dataset, config.data.val.dataset}
    for name in sorted(n for n in names if n.split("/")[0] == EMBEDDED):
        try:
            sources.dataset_dir(config.data.data_dir, name)
        except FileNotFoundError:
            variant = name.split("/")[1] if "/" in name else "default"
            print(f"building the embedded dataset {name} in {config.data.data_dir} ...", flush=True)
            args = ["--dataset", EMBEDDED, "--data_dir", config.data.data_dir, "--config", variant]
            if build.build(build.parse_args(args)) != 0:
                sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or not FLAGS.workdir:
        raise app.UsageError("usage: main --config configs/X.py --workdir DIR")
    _maybe_start_distributed()
    import jax

    from pgpc_jax import train

    logging.info(
        "jax %s, process %d/%d, %d local / %d global devices: %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices(),
    )
    _ensure_embedded_dataset(FLAGS.config)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, predictions.")
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=parse_flags)
