"""Entry point: `python -m pgpc_jax.main --config configs/X.py --workdir DIR [--config.key=value ...]`.

Starts `jax.distributed` on multi-process runs, logs the devices and versions, builds the
embedded dataset if the config uses it and it is absent, and hands over to
`train.train_and_evaluate`. Re-running the same command resumes from the workdir's last
checkpoint.

Several processes (a TPU pod slice, SLURM, several GPU hosts, or N CPU processes on one machine)
run the same command. The cluster is found from the environment on TPU pods and under SLURM
(`srun`); anywhere else each process is told with `--coordinator_address host:port
--num_processes N --process_id i` (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID). The workdir may be a `gs://` path. `launch/` has the scripts that start it on
a TPU pod slice (`tpu_pod.sh`), under SLURM (`slurm.sbatch`), on one GPU host (`multi_gpu.sh`) and
as N local CPU processes (`local_processes.sh`), and the Colab notebook (`colab.ipynb`).

Output: the devices, the datasets, the model, "compiling the step ..." and its time, then a
progress line per log step (step, loss and its terms, steps/s, ETA), the evaluation's progress
and its per-class IoU table. Libraries' INFO logs (orbax, TFDS, grain) and XLA's slow-compile
alarms are left out; `--verbosity=0` shows them. `--print_config` prints the resolved config
(the file's, with the command's `--config.` overrides) and exits.

Compiled programs are kept in a persistent cache (`--compile_cache DIR`, default
`~/.cache/pgpc_jax/xla`; `--compile_cache=` turns it off), so a resumed or repeated run of the
same config and shapes reads its step instead of compiling it ("compiled in 2s"). A run of
several processes uses one only when `--compile_cache` names a folder they all share. A cache
set in the environment (JAX_COMPILATION_CACHE_DIR) is used as it is, whatever the flag says.

Bad input (a config value, a dataset that is not built, weights that do not fit, a workdir that
holds another model's run) stops with one line on stderr and exit status 2, before anything is
written; a non-finite loss stops with one line and exit status 1.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

from absl import app, flags, logging
from ml_collections import config_flags

from pgpc_jax.cli import parse_flags

FLAGS = flags.FLAGS
EMBEDDED = "synthetic_shift"


class DistributedSetupError(ValueError):
    """Incomplete or inconsistent multi-process settings."""


def distributed_settings(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    environ: Mapping[str, str],
) -> dict | None:
    """The arguments of `jax.distributed.initialize`, or None for a single-process run.

    Explicit settings (flags, else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID) must be complete. Otherwise a TPU pod slice (several TPU_WORKER_HOSTNAMES or
    a MEGASCALE coordinator) or a SLURM job of several tasks gives `{}`: JAX reads the cluster
    from the environment.
    """

    def env_int(name):
        value = environ.get(name)
        try:
            return None if value in (None, "") else int(value)
        except ValueError as e:
            raise DistributedSetupError(f"{name}={value!r}: expected an integer") from e

    address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else env_int("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else env_int("JAX_PROCESS_ID")
    explicit = {"--coordinator_address": address, "--num_processes": count, "--process_id": index}
    given = [k for k, v in explicit.items() if v is not None]
    if given:
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise DistributedSetupError(
                f"{' and '.join(given)} given without {' and '.join(missing)}: a multi-process "
                "run needs all three on every process (or JAX_COORDINATOR_ADDRESS, "
                "JAX_NUM_PROCESSES, JAX_PROCESS_ID), e.g. --coordinator_address=host0:12355 "
                "--num_processes=2 --process_id=0"
            )
        if count < 1 or not 0 <= index < count:
            raise DistributedSetupError(
                f"--process_id={index} with --num_processes={count}: expected 0 <= id < count"
            )
        return dict(coordinator_address=address, num_processes=count, process_id=index)
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
        return {}
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}
    return None


def default_compile_cache(environ: Mapping[str, str]) -> str:
    """The persistent compilation cache's default folder: `$XDG_CACHE_HOME/pgpc_jax/xla`
    (`~/.cache/pgpc_jax/xla`), local to each host (a gs:// workdir's run keeps it on the host)."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pgpc_jax", "xla")


def use_compile_cache(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` (None: the default folder; '':
    off), unless a cache is configured already (JAX_COMPILATION_CACHE_DIR, or the caller's
    `jax_compilation_cache_dir`), which is kept. Programs that took at least a second to compile
    are written there, so a resumed or repeated run of the same config reads its step instead
    of compiling it. Returns the folder in use, or None."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if directory == "":
        return None
    directory = os.path.expanduser(directory or default_compile_cache(os.environ))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory


def _ensure_embedded_dataset(config) -> bool:
    """Build the embedded domain-shift dataset on first use (a minute or two on a CPU); False
    if the build failed (it printed why)."""
    import jax

    from data_pipelines import build, sources

    names = {config.data.source.dataset, config.data.target.dataset, config.data.val.dataset}
    for name in sorted(n for n in names if n.split("/")[0] == EMBEDDED):
        try:
            sources.dataset_dir(config.data.data_dir, name)
        except FileNotFoundError:
            if jax.process_count() > 1:
                raise sources.DatasetNotBuiltError(
                    f"the embedded dataset {name} is not built in {config.data.data_dir}: with "
                    "several processes, build it once first: python -m data_pipelines.build "
                    f"--dataset {EMBEDDED} --data_dir {config.data.data_dir}"
                ) from None
            variant = name.split("/")[1] if "/" in name else "default"
            print(f"building the embedded dataset {name} in {config.data.data_dir} ...", flush=True)
            args = ["--dataset", EMBEDDED, "--data_dir", config.data.data_dir, "--config", variant]
            if build.build(build.parse_args(args)) != 0:
                return False
    return True


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input: reported as one line (their messages say what to do)."""
    from data_pipelines import builder_base, sources
    from pgpc_jax import checkpointing, config_checks, predict, torch_names

    return (
        config_checks.ConfigError,
        checkpointing.CheckpointError,
        torch_names.ConversionError,
        predict.PredictError,
        sources.DatasetNotBuiltError,
        sources.UnknownSplitError,
        builder_base.LayoutError,
        DistributedSetupError,
    )


def run(
    config, workdir: str, settings: dict | None = None, compile_cache: str | None = None
) -> int:
    """Start JAX (several processes when `settings` say so), train and evaluate; returns the
    exit status: 0 done, 2 bad input (one line on stderr), 1 a non-finite loss. `compile_cache`
    is `use_compile_cache`'s folder (None: the default one for a single process, none for
    several; '': none)."""
    import jax

    if settings is not None:
        jax.distributed.initialize(**settings)
    # Several processes: only a folder they all read (--compile_cache gs://...), never by default:
    # a process that reads its step while another compiles it waits at the first collective.
    multi = jax.process_count() > 1
    cache = use_compile_cache("" if compile_cache is None and multi else compile_cache)

    from pgpc_jax import metrics_logging, train

    if jax.process_index() == 0:
        print(
            f"jax {jax.__version__} on {jax.default_backend()}: {jax.process_count()} "
            f"process(es), {jax.local_device_count()} local / {jax.device_count()} devices "
            f"({jax.devices()[0].device_kind})",
            flush=True,
        )
        if cache:
            print(f"compilation cache: {cache}", flush=True)
    try:
        if not _ensure_embedded_dataset(config):
            return 2
        train.train_and_evaluate(config, workdir)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except metrics_logging.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> None:
    if not FLAGS["verbosity"].present:  # orbax, TFDS and grain log every action at INFO
        logging.set_verbosity(logging.WARNING)
    if FLAGS.print_config:
        if FLAGS.config is None:
            raise app.UsageError("--print_config needs --config configs/X.py")
        print(FLAGS.config)
        return
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or not FLAGS.workdir:
        raise app.UsageError("usage: main --config configs/X.py --workdir DIR")
    try:
        settings = distributed_settings(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, os.environ
        )
    except DistributedSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run(FLAGS.config, FLAGS.workdir, settings, FLAGS.compile_cache))


def define_flags() -> None:
    """Command-line flags; defined only when run as a program."""
    config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, logs.")
    flags.DEFINE_string(
        "coordinator_address", None, "Multi-process runs: host:port of process 0's coordinator."
    )
    flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
    flags.DEFINE_bool(
        "print_config", False, "Print the resolved config (with the overrides) and exit."
    )
    flags.DEFINE_string(
        "compile_cache",
        None,
        "Folder of the persistent compilation cache (default $XDG_CACHE_HOME/pgpc_jax/xla, i.e. "
        "~/.cache/pgpc_jax/xla, for a single process; '' turns it off; several processes: a "
        "folder they all share, e.g. gs://...): a repeated or resumed run reads its compiled "
        "step from there instead of compiling it again.",
    )


def cli() -> None:
    """The `pgpc-train` command (`python -m pgpc_jax.main`)."""
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
