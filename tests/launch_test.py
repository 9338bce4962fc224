"""The launch scripts (`launch/*.sh`, `launch/slurm.sbatch`): they parse, their dry runs print
the commands a TPU pod, a SLURM job, a GPU host and N local processes run, bad input is one
line with exit status 2, and the parts that can run here (the pod workers' shell commands, the
SLURM and GPU launch with stand-ins for srun / nvidia-smi / python, the supervision of N local
processes) do what the dry runs say. The file takes seconds; the real two-process training
through `launch/local_processes.sh` is in multiprocess_test.py."""

import json
import os
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["tpu_pod.sh", "slurm.sbatch", "multi_gpu.sh", "local_processes.sh"]
MAIN = ["--config", "configs/gta2cs.py", "--workdir", "gs://bucket/runs/gta2cs"]


def _run(script, *args, env=None, cwd=ROOT, timeout=60):
    return subprocess.run(
        ["bash", os.path.join(ROOT, "launch", script), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _commands(stdout: str) -> list[list[str]]:
    """The argv of each printed command (the lines starting with '+ ')."""
    return [
        shlex.split(line[2:], comments=True) for line in stdout.splitlines() if line[:2] == "+ "
    ]


def _option(argv, name):
    """The value of `name VALUE` or `name=VALUE` in argv."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    raise AssertionError(f"{name} not in {argv}")


def _one_error_line(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert "+ " not in result.stdout  # nothing would have run


def _stub(path, body: str) -> str:
    """An executable Python script standing in for a program."""
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_explain_themselves(script):
    path = os.path.join(ROOT, "launch", script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(path, os.X_OK)  # the README runs them as launch/NAME
    result = _run(script, "--help")
    assert result.returncode == 0
    assert "Needs:" in result.stdout and "Example" in result.stdout
    assert "--dry-run" in result.stdout


# --- TPU pod -------------------------------------------------------------------------------


def _tpu_dry_run(*options, main=MAIN, env=None):
    result = _run("tpu_pod.sh", "--dry-run", *options, "--", *main, env=env)
    assert result.returncode == 0, result.stderr
    return _commands(result.stdout)


def _ssh(commands, worker):
    """The remote command strings of the `ssh --worker=WORKER` calls, in order."""
    return [
        _option(c, "--command")
        for c in commands
        if c[0] == "gcloud" and "tpu-vm" in c and "ssh" in c and _option(c, "--worker") == worker
    ]


def test_tpu_pod_dry_run():
    commands = _tpu_dry_run(
        "--name", "pod", "--zone", "europe-west4-a", "--accelerator-type", "v5p-64",
        "--data_dir", "gs://bucket/tfds", "--spot",
    )  # fmt: skip
    create = [c for c in commands if "create" in c]
    assert len(create) == 1
    assert create[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
    assert _option(create[0], "--zone") == "europe-west4-a"
    assert _option(create[0], "--accelerator-type") == "v5p-64"
    assert _option(create[0], "--version") == "tpu-ubuntu2204-base"
    assert "--spot" in create[0]
    assert any("describe" in c and "pod" in c for c in commands)  # reused if it exists
    # The code goes to every worker (a tarball of this checkout by default), then the packages.
    scp = [c for c in commands if "scp" in c]
    assert len(scp) == 1 and _option(scp[0], "--worker") == "all"
    install, train = _ssh(commands, "all")
    assert "tar -xzf" in install and "requirements.txt" in install and "jax[tpu]" in install
    # The dataset is built once, on worker 0, into the bucket, before the training starts.
    build, stream = _ssh(commands, "0")
    assert "-m data_pipelines.build --dataset synthetic_shift --data_dir gs://bucket/tfds" in build
    order = [c for c in commands if "ssh" in c]
    assert [_option(c, "--command") for c in order] == [install, build, train, stream]
    # Every worker runs the same main command, with the datasets' location added.
    assert "-m pgpc_jax.main --config configs/gta2cs.py --workdir gs://bucket/runs/gta2cs" in train
    assert "--config.data.data_dir=gs://bucket/tfds" in train
    assert "pgpc_jax_run.log" in train and "tail" in stream and "pgpc_jax_run.log" in stream


def test_tpu_pod_options_from_the_environment_and_git_install():
    env = {"PGPC_TPU_NAME": "envpod", "PGPC_TPU_ZONE": "us-east5-a", "PGPC_TPU_TYPE": "v6e-16"}
    commands = _tpu_dry_run(
        "--install", "git", "--repo", "https://example.com/pgpc_jax.git", "--ref", "v1.0",
        "--skip_build", "--data_dir", "gs://bucket/tfds", "--project", "proj", env=env,
    )  # fmt: skip
    (create,) = [c for c in commands if "create" in c]
    assert create[:8] == [
        "gcloud",
        "--project",
        "proj",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "envpod",
    ]
    assert _option(create, "--zone") == "us-east5-a"
    assert _option(create, "--accelerator-type") == "v6e-16"
    assert not any("scp" in c for c in commands)
    install, train = _ssh(commands, "all")
    assert "git clone --quiet https://example.com/pgpc_jax.git pgpc_jax" in install
    assert "checkout --quiet v1.0" in install
    assert not any("data_pipelines.build" in c for c in _ssh(commands, "0"))  # --skip_build
    assert "--config.data.data_dir=gs://bucket/tfds" in train


def test_tpu_pod_refuses_local_paths_and_bad_options():
    local = [*MAIN[:3], "runs/gta2cs"]
    _one_error_line(_run("tpu_pod.sh", "--dry-run", "--", *local), "runs/gta2cs", "gs://")
    _one_error_line(
        _run("tpu_pod.sh", "--dry-run", "--", "--config", "c.py", "--workdir=/tmp/run"), "gs://"
    )
    _one_error_line(
        _run("tpu_pod.sh", "--dry-run", "--data_dir", "/data/tfds", "--", *MAIN), "/data/tfds"
    )
    _one_error_line(_run("tpu_pod.sh", "--dry-run", "--", "--config", "c.py"), "--workdir")
    _one_error_line(_run("tpu_pod.sh", "--dry-run", "--install", "scp", "--", *MAIN), "scp")
    _one_error_line(_run("tpu_pod.sh", "--dry-run", "--workers", "4", "--", *MAIN), "--workers")


def test_tpu_pod_code_tarball(tmp_path):
    """The tarball copied to the workers (--install local) holds the code and requirements, not
    the virtual environment or runs."""
    result = _run("tpu_pod.sh", "--dry-run", "--", *MAIN, env={"TMPDIR": str(tmp_path)})
    (pipeline,) = [line[2:] for line in result.stdout.splitlines() if "| tar" in line]
    subprocess.run(["bash", "-c", pipeline], check=True, timeout=60)
    with tarfile.open(tmp_path / "pgpc_jax_code.tar.gz") as tar:
        names = set(tar.getnames())
    for name in ("pgpc_jax/main.py", "data_pipelines/build.py", "configs/gta2cs.py"):
        assert name in names
    assert "requirements.txt" in names and "launch/tpu_pod.sh" in names
    assert not any(n.startswith((".venv/", ".git/", "runs/")) for n in names)


def test_tpu_pod_worker_commands_run_main_detached_and_report_its_status(tmp_path):
    """The commands the workers get, run here in a stand-in home folder: main receives exactly
    the arguments given (quotes and $ included), detached; the log stream ends with process
    0's exit status; a second start is refused while the run goes on; --stop ends it."""
    home = tmp_path / "home"
    (home / "pgpc_jax").mkdir(parents=True)
    (home / "pgpc_jax_venv" / "bin").mkdir(parents=True)
    _stub(
        home / "pgpc_jax_venv" / "bin" / "python",
        "print(json.dumps(sys.argv[1:]), flush=True)\n"
        "time.sleep(float(os.environ.get('STUB_SECONDS', '0')))\n"
        "sys.exit(3)",
    )
    tricky = '--config.note=it\'s "quoted" $HOME'
    commands = _tpu_dry_run(main=[*MAIN, tricky])
    (_, train), (stream,) = _ssh(commands, "all"), _ssh(commands, "0")
    (stop,) = _ssh(_commands(_run("tpu_pod.sh", "--dry-run", "--stop").stdout), "all")

    def on_worker(command, seconds="0"):
        env = {"HOME": str(home), "PATH": os.environ["PATH"], "STUB_SECONDS": seconds}
        return subprocess.run(
            ["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=30
        )

    assert on_worker(train).returncode == 0  # returns at once: the run is detached
    streamed = on_worker(stream)
    assert streamed.returncode == 3 and "exit status 3" in streamed.stderr
    assert json.loads(streamed.stdout.splitlines()[0]) == ["-m", "pgpc_jax.main", *MAIN, tricky]

    assert on_worker(train, seconds="30").returncode == 0
    time.sleep(0.5)
    again = on_worker(train)
    assert again.returncode == 3 and "still going" in again.stderr and "--stop" in again.stderr
    assert "stopped" in on_worker(stop).stdout
    assert on_worker(stream).returncode == 1  # stopped: no exit status was written


# --- SLURM ---------------------------------------------------------------------------------

SLURM_MAIN = ["--config", "configs/gta2cs.py", "--workdir", "/shared/runs/gta2cs"]


def test_slurm_batch_lines_and_dry_run():
    text = open(os.path.join(ROOT, "launch", "slurm.sbatch")).read()
    for line in ("--nodes=", "--gpus-per-node=8", "--ntasks-per-node=1"):
        assert f"\n#SBATCH {line}" in text
    result = _run("slurm.sbatch", "--dry-run", *SLURM_MAIN, env={"SLURM_JOB_ID": ""})
    assert result.returncode == 0, result.stderr
    (command,) = _commands(result.stdout)
    # One task per node: each process drives its node's 8 GPUs, not only GPU SLURM_LOCALID.
    assert command[:2] == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"]
    srun = command.index("srun")
    assert command[srun:] == ["srun", "--kill-on-bad-exit=1", "python", "-m", "pgpc_jax.main", *SLURM_MAIN]  # fmt: skip
    for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID"):
        assert f"#   {name}=" in result.stdout


def test_slurm_one_task_per_gpu_and_refusals():
    per_gpu = {"SLURM_NTASKS_PER_NODE": "4", "SLURM_GPUS_PER_NODE": "a100:4"}
    result = _run("slurm.sbatch", "--dry-run", "--", *SLURM_MAIN, env=per_gpu)
    (command,) = _commands(result.stdout)
    assert command[0] == "srun" and not any("JAX_LOCAL_DEVICE_IDS" in a for a in command)
    assert command[-4:] == SLURM_MAIN
    odd = {"SLURM_NTASKS_PER_NODE": "3", "SLURM_GPUS_PER_NODE": "4"}
    _one_error_line(_run("slurm.sbatch", "--dry-run", *SLURM_MAIN, env=odd), "--ntasks-per-node=3")
    outside = {"SLURM_JOB_ID": ""}
    _one_error_line(_run("slurm.sbatch", *SLURM_MAIN, env=outside), "sbatch")


def test_slurm_job_runs_srun_from_the_submit_dir(tmp_path):
    """As sbatch runs it (SLURM's variables set): srun (a stand-in) gets main's command, in the
    submit folder, with the environment JAX's SLURM detection and this script give it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(
        bin_dir / "srun",
        "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),"
        " 'ids': os.environ.get('JAX_LOCAL_DEVICE_IDS'),"
        " 'cpus': os.environ.get('SRUN_CPUS_PER_TASK')}))",
    )
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "1234",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_GPUS_PER_NODE": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_CPUS_PER_TASK": "12",
        "PYTHON": "python3",
    }
    result = _run("slurm.sbatch", *SLURM_MAIN, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["argv"] == ["--kill-on-bad-exit=1", "python3", "-m", "pgpc_jax.main", *SLURM_MAIN]
    assert seen["cwd"] == str(tmp_path) and seen["ids"] == "0,1" and seen["cpus"] == "12"


# --- One GPU host --------------------------------------------------------------------------


def test_multi_gpu_dry_run_and_checks(tmp_path):
    dry = {"PATH": "/usr/bin:/bin", "PYTHON": "python"}
    result = _run("multi_gpu.sh", "--dry-run", "--", *SLURM_MAIN, env=dry)
    assert result.returncode == 0, result.stderr  # no nvidia-smi needed for a dry run
    assert _commands(result.stdout) == [["python", "-m", "pgpc_jax.main", *SLURM_MAIN]]

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho 'GPU 1: NVIDIA H100 (UUID: b)'\n"
    )
    (bin_dir / "nvidia-smi").chmod(0o755)
    python = _stub(
        tmp_path / "python",
        "if sys.argv[1] == '-c':\n    print(os.environ['STUB_JAX_GPUS'])\n"
        "else:\n    print(json.dumps(sys.argv[1:]))",
    )
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": python}
    result = _run("multi_gpu.sh", *SLURM_MAIN, env={**env, "STUB_JAX_GPUS": "2"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["-m", "pgpc_jax.main", *SLURM_MAIN]
    assert result.stderr.startswith("2 GPUs on ")
    # A CPU-only jax would train on the CPU: refused, with the install command.
    cpu_jax = _run("multi_gpu.sh", *SLURM_MAIN, env={**env, "STUB_JAX_GPUS": "0"})
    _one_error_line(cpu_jax, "JAX sees none", "jax[cuda12]")


# --- N local processes ---------------------------------------------------------------------


def test_local_processes_dry_run():
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"}
    main = ["--config", "configs/synthetic.py", "--workdir", "runs/three processes"]
    result = _run("local_processes.sh", "3", "--devices_per_process", "2", "--dry-run", "--", *main, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert len(commands) == 3
    addresses = set()
    for i, command in enumerate(commands):
        assert command[0] == "env"
        assert "JAX_PLATFORMS=cpu" in command and "JAX_ENABLE_COMPILATION_CACHE=false" in command
        # The user's other XLA flags are kept, the device count is this script's.
        assert "XLA_FLAGS=--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2" in command  # fmt: skip
        start = command.index("-m")
        assert command[start : start + 2 + len(main)] == ["-m", "pgpc_jax.main", *main]
        assert _option(command, "--num_processes") == "3"
        assert _option(command, "--process_id") == str(i)
        addresses.add(_option(command, "--coordinator_address"))
    (address,) = addresses  # one coordinator for all
    assert address.startswith("localhost:") and int(address.split(":")[1]) > 0
    assert "output: this script's stdout" in result.stdout.splitlines()[0]
    assert "process_2.log" in result.stdout.splitlines()[2]


def test_local_processes_refusals():
    script = "local_processes.sh"
    _one_error_line(_run(script, "--dry-run", "--", *MAIN), "number of processes")
    _one_error_line(_run(script, "two", "--dry-run", "--", *MAIN), "two")
    _one_error_line(_run(script, "2", "--devices_per_process", "0", "--dry-run", "--", *MAIN), "0")
    given = [*MAIN, "--process_id=1"]
    _one_error_line(_run(script, "2", "--dry-run", "--", *given), "--process_id")


def test_local_processes_outputs_and_a_failure_stops_the_others(tmp_path):
    """With a stand-in for python: process 0 on stdout, the others in their log files; when
    one process fails, the others are stopped and its exit status is the script's."""
    python = _stub(
        tmp_path / "python",
        "i = sys.argv[-1]\n"
        "print(f'process {i}: ' + ' '.join(sys.argv[1:]), flush=True)\n"
        "open(os.path.join(os.environ['STUB_DIR'], f'pid_{i}'), 'w').write(str(os.getpid()))\n"
        "if os.environ.get('STUB_FAIL') == i:\n    time.sleep(0.5)\n    sys.exit(7)\n"
        "time.sleep(30 if os.environ.get('STUB_FAIL') else 0)",
    )
    env = {"PYTHON": python, "STUB_DIR": str(tmp_path)}
    logs = tmp_path / "logs"
    args = ["3", "--port", "23456", "--log_dir", str(logs), "--", "--workdir", "w"]
    result = _run("local_processes.sh", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("process 0: -m pgpc_jax.main --workdir w")
    assert "--coordinator_address localhost:23456 --num_processes 3" in result.stdout
    for i in (1, 2):
        assert (logs / f"process_{i}.log").read_text().startswith(f"process {i}: ")

    start = time.time()
    failed = _run("local_processes.sh", *args, env={**env, "STUB_FAIL": "1"})
    assert failed.returncode == 7
    assert time.time() - start < 20  # the others were stopped, not waited for
    assert "process 1 of 3 exited with status 7" in failed.stderr
    assert str(logs / "process_1.log") in failed.stderr
    for i in (0, 2):
        pid = int((tmp_path / f"pid_{i}").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
