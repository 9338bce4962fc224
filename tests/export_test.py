"""A trained run is usable: `python -m pgpc_jax.export`, and `predict` / `evaluate` on a run.

One tiny PGPC run is trained once for the module (`train.train_and_evaluate`, the 4 steps of
tests/train_resume_test.py on one device, a checkpoint and an evaluation after each step, so
`checkpoints/` holds steps 1 to 4 and `best/` one of them). Then every command runs in a
subprocess as a user runs it, several at a time (tests/multiprocess_test.py restores a checkpoint
of 2 processes x 4 devices on one device):

* daformer: read by PyTorch as DAFormer's tools/test.py reads it (`model.` stripped by mmcv's
  key revision, loaded into the original segmentor of tests/torch_segmentor.py) gives our
  whole-image logits of the run's student; `ema_model.*` is the teacher; `--which teacher` puts
  the teacher under `model.`; `convert.to_flax --which model|ema_model` reads both back;
* flax `--best --which teacher`: the best step's teacher; `predict --weights RUN/best --which
  ema_model` gives exactly the logits of the exported directory;
* mit `--step 1`: step 1's encoder, loaded strictly into the original MiT;
* hf for a DAFormer head, and every bad input: one line on stderr, exit 2, nothing written;
* `evaluate --weights RUN --cityscapes-eval` on a Cityscapes-layout folder: the official tool's
  mIoU equals ours.

In-process: a run is checked against the config's model like a weights directory, and a config
can start from a run (`init_from.format='run'`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import data_fixtures
import jax
import numpy as np
import pytest
import torch
import torch_segmentor
from cityscapesscripts.helpers import labels as cs_labels
from PIL import Image
from tiny_run import tiny_config

from data_pipelines import build
from pgpc_jax import checkpointing, convert, evaluation, predict, weights
from pgpc_jax.models import segmentor
from pgpc_jax.torch_names import variables_to_canonical

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The run's model on the command line: configs/synthetic.py with the sizes `tiny_config` sets.
MODEL_FLAGS = ("--config=configs/synthetic.py", "--config.model.head_embed_dim=16")
MODEL_FLAGS += ("--config.model.head_channels=16",)
IMAGE_HW = (75, 101)  # non-square, not a multiple of 32
RTOL = 1e-5  # of the largest |logit|


def _env() -> dict:
    return {
        **os.environ,
        "XLA_FLAGS": "",  # one CPU device: a checkpoint of the 2-device run restores on one
        "JAX_PLATFORMS": "cpu",
        # The tests' persistent compilation cache, shared with this process.
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
    }


def _run_all(commands: dict[str, list[str]], parallel: int = 4) -> dict:
    """Run `python -m <args>` for each entry, `parallel` at a time; {name: CompletedProcess}."""
    pending, running, done = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, args = pending.pop(0)
            running[name] = subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=ROOT,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        name = next(iter(running))
        out, err = running[name].communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(args, running.pop(name).returncode, out, err)
    return done


def _listing(root: str) -> dict[str, tuple[int, float]]:
    """{relative path: (size, mtime)} of every file under `root`."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = (os.path.getsize(path), os.path.getmtime(path))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, run config): the tiny run, trained once."""
    from pgpc_jax import train

    data_dir = str(tmp_path_factory.mktemp("data"))
    args = ["--dataset", "synthetic_shift", "--config", "tiny", "--data_dir", data_dir]
    assert build.build(build.parse_args(args)) == 0
    # The 4-step, 1-device run of tests/train_resume_test.py: the same compiled step.
    config = tiny_config(data_dir, 4)
    config.checkpoint_every_steps = 1
    config.keep_checkpoints = 4
    config.eval_every_steps = 1
    workdir = str(tmp_path_factory.mktemp("runs") / "tiny")
    train.train_and_evaluate(config, workdir)
    return workdir, config


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    """A Cityscapes-layout folder: leftImg8bit/val, gtFine/val with labelIds, labelTrainIds and
    instanceIds (24x48 images)."""
    root = str(tmp_path_factory.mktemp("cityscapes"))
    data_fixtures.add_cityscapes_derived(root, data_fixtures.make_cityscapes(root))
    return root


@pytest.fixture(scope="module")
def cli(run, cityscapes, tmp_path_factory):
    """Every command of this module, run once: (results by name, out folder, run listings)."""
    workdir, _ = run
    out = str(tmp_path_factory.mktemp("out"))
    image = os.path.join(out, "street.png")
    rgb = np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(image)
    a_file = os.path.join(out, "a_file")
    open(a_file, "w").close()
    before = _listing(workdir)

    def export(*args):
        return ["pgpc_jax.export", f"--workdir={workdir}", *args]

    commands = {
        "daformer": export("--format=daformer", f"--out={out}/student.pth"),
        "daformer_teacher": export(
            "--format=daformer", "--which=teacher", f"--out={out}/teacher.pth"
        ),
        "flax_best_teacher": export(
            "--format=flax", "--best", "--which=teacher", f"--out={out}/best_teacher"
        ),
        "mit_step1": export("--format=mit", "--step=1", f"--out={out}/mit_step1.pth"),
        "predict": [
            "pgpc_jax.predict",
            *MODEL_FLAGS,
            f"--weights={workdir}/best",
            "--which=ema_model",
            "--save-logits",
            f"--out={out}/predict",
            image,
        ],
        "evaluate": [
            "pgpc_jax.evaluate",
            *MODEL_FLAGS,
            f"--weights={workdir}",
            f"--images={cityscapes}/leftImg8bit/val",
            f"--labels={cityscapes}/gtFine/val",
            "--image-suffix=_leftImg8bit.png",
            "--label-suffix=_gtFine_labelTrainIds.png",
            "--resize=40,20",  # the network at 20x40, predictions at the labels' 24x48
            "--cityscapes-eval",
            f"--out={out}/evaluate",
        ],
        # Bad input: (command, what the one line says, the path that must not appear).
        "bad_hf": export("--format=hf", f"--out={out}/bad_hf"),
        "bad_no_run": ["pgpc_jax.export", f"--workdir={out}/nope", "--format=mit"]
        + [f"--out={out}/bad_no_run.pth"],
        "bad_step": export("--format=mit", "--step=7", f"--out={out}/bad_step.pth"),
        "bad_step_and_best": export(
            "--format=mit", "--step=1", "--best", f"--out={out}/bad_step_and_best.pth"
        ),
        "bad_format": export("--format=onnx", f"--out={out}/bad_format.onnx"),
        "bad_out": export("--format=mit", f"--out={a_file}/sub/bad_out.pth"),
    }
    results = _run_all(commands)
    return results, out, before, _listing(workdir)


def _student_and_teacher(workdir: str, **which_checkpoint):
    """(step, student variables, teacher variables) of a checkpoint, as numpy."""
    _, state, step = weights.load_run(workdir, **which_checkpoint)
    assert int(state.step) == step  # the TrainState's own counter: the checkpoint asked for
    student = jax.device_get(weights.run_variables(state, "model"))
    teacher = jax.device_get(weights.run_variables(state, "ema_model"))
    return step, student, teacher


def _assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------


def test_run_paths_are_found(tmp_path):
    (tmp_path / "run" / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "run" / "best").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    run = tmp_path / "run"
    root = checkpointing.run_path(run)
    assert weights.find_run(run) == weights.RunCheckpoint(root)
    assert weights.find_run(run / "best") == weights.RunCheckpoint(root, best=True)
    assert weights.find_run(run / "checkpoints" / "3") == weights.RunCheckpoint(root, 3)
    assert weights.find_run(run / "best" / "5") == weights.RunCheckpoint(root, 5, best=True)
    assert weights.find_run(run / "checkpoints" / "x") is None
    assert weights.find_run(tmp_path) is None
    with pytest.raises(weights.WeightsError, match="not a training run directory .*no config"):
        weights.read_run_config(tmp_path)


def test_a_run_is_read_only_for_its_own_model(run):
    """Like a weights directory, a run must hold the config's model (checked on its config.json
    before any checkpoint is read), and it holds a student and a teacher only. A config can
    start from a run (`init_from.format='run'`)."""
    from pgpc_jax import train

    workdir, config = run
    model_cfg = config.model.to_dict()
    with pytest.raises(
        weights.WeightsError,
        match=r"\(its config.json\) holds a different model than the config: "
        "model.head_channels: weights 16 vs config 32",
    ):
        weights.load_model(dict(model_cfg, head_channels=32), workdir)
    with pytest.raises(weights.WeightsError, match="holds the student .* and the EMA teacher"):
        weights.load_model(model_cfg, workdir, "run", "imnet_model")
    with pytest.raises(weights.WeightsError, match="nope is not a training run directory"):
        weights.load_model(model_cfg, os.path.join(workdir, "nope"), "run")

    config = config.copy_and_resolve_references()
    config.init_from.path, config.init_from.format = os.path.join(workdir, "best"), "run"
    config.init_from.which = "ema_model"
    variables = train.initial_variables(config, segmentor.build_segmentor(model_cfg))
    _, _, teacher = _student_and_teacher(workdir, best=True)
    _assert_same_tensors(
        variables_to_canonical(jax.device_get(variables)), variables_to_canonical(teacher), "init"
    )


def test_daformer_export_is_the_run_in_pytorch(run, cli):
    workdir, config = run
    results, out, _, _ = cli
    _ok(results["daformer"])
    _ok(results["daformer_teacher"])
    assert "wrote" in results["daformer"].stdout and "step 4" in results["daformer"].stdout
    assert "note: the teacher has no BatchNorm running statistics" in results["daformer"].stdout
    step, student, teacher = _student_and_teacher(workdir)
    assert step == 4

    saved = torch.load(f"{out}/student.pth", map_location="cpu", weights_only=True)
    assert saved["meta"]["iter"] == 4
    assert list(saved["meta"]["CLASSES"]) == list(convert.class_table("cityscapes")[0])
    assert len(saved["meta"]["PALETTE"]) == 19
    state = {k: v.numpy() for k, v in saved["state_dict"].items()}

    # DAFormer's tools/test.py: load_checkpoint(revise_keys=[..., ('model.', '')]) with mmcv's
    # default strict=False: `model.*` become the segmentor's keys and `ema_model.*` become
    # `ema_*` keys it reports as unexpected and skips.
    revised = torch_segmentor.revise_keys(saved["state_dict"])
    network = {k: v for k, v in revised.items() if not k.startswith("ema_")}
    assert set(revised) - set(network) == {f"ema_{k}" for k in network}
    model_cfg = config.model.to_dict()
    reference = torch_segmentor.load_as_daformer_test(f"{out}/student.pth", model_cfg)

    image = np.random.default_rng(1).standard_normal((1, *IMAGE_HW, 3)).astype(np.float32)
    model = segmentor.build_segmentor(model_cfg)
    predict_fn = jax.jit(lambda v, x: evaluation.whole_inference(model, v, x))
    error = torch_segmentor.logits_error(reference, lambda x: predict_fn(student, x), image)
    print(f"daformer export in PyTorch vs JAX: max |logit diff| / max |logit| = {error:.2e}")
    assert error <= RTOL

    # ema_model.* is the teacher (with the student's BN statistics); --which teacher puts the
    # teacher under model.; convert reads either network back.
    def under(state, prefix):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    _assert_same_tensors(under(state, "model."), variables_to_canonical(student), "model.")
    _assert_same_tensors(under(state, "ema_model."), variables_to_canonical(teacher), "ema")
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(student["params"]), jax.tree.leaves(teacher["params"]), strict=True
        )
    )
    saved = torch.load(f"{out}/teacher.pth", map_location="cpu", weights_only=True)
    swapped = {k: v.numpy() for k, v in saved["state_dict"].items()}
    _assert_same_tensors(under(swapped, "model."), variables_to_canonical(teacher), "teacher")
    _assert_same_tensors(under(swapped, "ema_model."), variables_to_canonical(teacher), "ema")
    for which, want_vars in (("model", student), ("ema_model", teacher)):
        back, left = convert.to_flax(f"{out}/student.pth", "daformer", model_cfg, which)
        assert not left
        _assert_same_tensors(variables_to_canonical(back), variables_to_canonical(want_vars), which)


def test_flax_export_of_the_best_teacher_predicts_as_the_run(run, cli):
    workdir, config = run
    results, out, _, _ = cli
    _ok(results["flax_best_teacher"])
    _ok(results["predict"])
    best_steps = [int(n) for n in os.listdir(os.path.join(workdir, "best")) if n.isdigit()]
    assert len(best_steps) == 1
    step, _, teacher = _student_and_teacher(workdir, best=True)
    assert step == best_steps[0]
    assert f"step {step}" in results["flax_best_teacher"].stdout

    directory = f"{out}/best_teacher"
    meta = checkpointing.read_model_file(directory)["meta"]
    assert (meta["step"], meta["which"], meta["classes"]) == (step, "ema_model", "cityscapes")
    model_cfg = config.model.to_dict()
    model, variables = predict.load_model(model_cfg, directory, "flax")
    _assert_same_tensors(
        variables_to_canonical(jax.device_get(variables)), variables_to_canonical(teacher), "flax"
    )

    # `predict --weights RUN/best --which ema_model` (the run read directly, in a subprocess)
    # gives exactly the logits of the exported directory.
    rgb = np.asarray(Image.open(f"{out}/street.png"))
    logits = predict.make_predictor(model)(variables, predict.normalize(rgb))
    from_run = np.load(f"{out}/predict/street_logits.npy")
    assert from_run.shape == (*IMAGE_HW, 19)
    np.testing.assert_array_equal(from_run, logits)
    assert "the EMA teacher of" in results["predict"].stderr


def test_mit_export_of_step_1_loads_into_the_original_mit(run, cli):
    workdir, config = run
    results, out, _, _ = cli
    _ok(results["mit_step1"])
    assert "step 1" in results["mit_step1"].stdout
    mit = torch.load(f"{out}/mit_step1.pth", map_location="cpu", weights_only=True)
    backbone = torch_segmentor.torch_mit_for(config.model.to_dict())
    backbone.load_state_dict(mit, strict=True)

    _, step1, _ = _student_and_teacher(workdir, step=1)
    _, step2, _ = _student_and_teacher(workdir, step=2)  # a later step
    encoder = {k: v.numpy() for k, v in mit.items()}
    want = convert.from_flax(step1, "mit")
    _assert_same_tensors(encoder, want, "mit")
    later = convert.from_flax(step2, "mit")
    assert any(not np.array_equal(encoder[k], later[k]) for k in encoder)  # step 1, not 2


@pytest.mark.parametrize(
    "name, message",
    [
        ("bad_hf", "HF SegFormer has only the SegFormer head; use --format daformer"),
        ("bad_no_run", "nope is not a training run directory (no such directory"),
        ("bad_step", "checkpoint of step 7; it has steps [1, 2, 3, 4]"),
        ("bad_step_and_best", "--step and --best exclude each other"),
        ("bad_format", "flag --format=onnx: value should be one of"),
        ("bad_out", "a_file is a file"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(cli, name, message):
    results, out, before, after = cli
    result = results[name]
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert not result.stdout
    assert not [n for n in os.listdir(out) if n.startswith(name)]
    assert not os.path.exists(os.path.join(out, "a_file", "sub"))
    assert after == before  # reading the run changed nothing in it


def test_official_cityscapes_evaluation_equals_ours(cityscapes, cli):
    results, out, _, _ = cli
    result = results["evaluate"]
    _ok(result)
    assert "cityscapesscripts evalPixelLevelSemanticLabeling on 2" in result.stdout
    metrics = json.loads(open(f"{out}/evaluate/metrics.json").read())["metrics"]
    assert 0 < metrics["eval/miou"] < 1
    assert metrics["cityscapes/miou"] == pytest.approx(metrics["eval/miou"], abs=1e-12)
    for key, value in metrics.items():
        if key.startswith("eval/iou/"):
            theirs = metrics[key.replace("eval/", "cityscapes/")]
            assert (theirs is None and value is None) or theirs == pytest.approx(value, abs=1e-12)
    # The fixture has instanceIds; the tool's instance code needs numpy's np.in1d (< 2.4).
    if hasattr(np, "in1d"):
        assert 0 <= metrics["cityscapes/niou"] <= 1
    else:
        assert "cityscapes/niou" not in metrics and "nIoU n/a" in result.stdout
    assert os.path.isfile(f"{out}/evaluate/resultPixelLevelSemanticLabeling.json")

    # Label ids at the labels' size, named for the tool, and nothing else.
    ids = {cs_labels.trainId2label[t].id for t in range(19)}
    for city, stem in (
        ("frankfurt", "frankfurt_000000_000294"),
        ("lindau", "lindau_000001_000019"),
    ):
        written = os.listdir(f"{out}/evaluate/cityscapes_results/{city}")
        assert written == [f"{stem}_pred_labelIds.png"]
        pred = np.asarray(Image.open(f"{out}/evaluate/cityscapes_results/{city}/{written[0]}"))
        assert pred.shape == (24, 48) and set(np.unique(pred)) <= ids


def test_a_run_without_teacher_exports_its_student_alone(tmp_path):
    """A source-only run has no EMA teacher: the daformer export holds `model.*` only, and
    `--which teacher` is one line saying why."""
    from configs import synthetic, tiny
    from pgpc_jax import export, methods, optim
    from pgpc_jax.train_state import create_train_state

    config = synthetic.get_config("source_only")
    config.model = tiny.get_config().model
    config.model.head_embed_dim = config.model.head_channels = 16
    root = tmp_path / "run"
    root.mkdir()
    (root / "config.json").write_text(config.to_json_best_effort())
    model = methods.build_model(config)
    variables = segmentor.init_variables(model, jax.random.key(0))
    optimizer = optim.make_optimizer(variables["params"], 10, **config.optimizer)
    state = create_train_state(config, variables, optimizer.tx)
    assert state.teacher_params is None
    ckpts = checkpointing.RunCheckpoints(root)
    ckpts.save(1, state, {})
    ckpts.close()
    out = str(tmp_path / "so.pth")
    lines = export.export_run(str(root), "daformer", out)
    assert "ema_model" not in lines[0]
    keys = torch.load(out, weights_only=True)["state_dict"].keys()
    assert keys and all(k.startswith("model.") for k in keys)
    with pytest.raises(export.ExportError, match="has no EMA teacher; use --which student"):
        export.export_run(str(root), "flax", str(tmp_path / "t"), which="teacher")
    assert not os.path.exists(tmp_path / "t")
    # A run of the code before methods were modules says so in one line.
    old = json.loads((root / "config.json").read_text())
    old["uda"]["method"], old["contrast"] = old.pop("method"), {"variant": "none"}
    (root / "config.json").write_text(json.dumps(old))
    with pytest.raises(weights.WeightsError, match="before methods were modules .*git 22e616e"):
        weights.load_run(str(root))
