"""`python -m data_pipelines.build --check`: a build's image counts against the released ones.

The fixtures hold a few images, so the match path passes the fixtures' own counts to
`build.check`; the CLI path shows that the command compares with the released counts.
"""

import os
import re

import data_fixtures as fx
import pytest

from data_pipelines import build

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "data.md")


def _build(*args):
    assert build.main(list(args)) == 0


@pytest.fixture(scope="module")
def gta(tmp_path_factory):
    """A GTA5 fixture (3 frames) built once at native size: (manual_dir, data_dir)."""
    root = tmp_path_factory.mktemp("gta_check")
    fx.make_gta(str(root / "gta"))
    _build("--dataset", "gta5", "--manual_dir", str(root / "gta"), "--data_dir", str(root / "out"))
    return str(root / "gta"), str(root / "out")


def _check(capsys, *args):
    status = build.main(["--check", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _errors(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_counts_that_match_pass(gta, capsys):
    _, data_dir = gta
    status = build.check(data_dir, "gta5", table={"gta5": {"train": 3}})
    out, err = capsys.readouterr()
    assert status == 0 and err == ""
    builder_dir = os.path.join(data_dir, "gta5", "full", "1.0.0")
    assert out.splitlines() == [f"gta5/full at {builder_dir}", "  train: found 3, expected 3 OK"]


def test_counts_that_differ_say_which_and_what_to_do(gta, capsys):
    _, data_dir = gta
    status = build.check(data_dir, "gta5", "full", table={"gta5": {"train": 5, "val": 2}})
    out, err = capsys.readouterr()
    assert status == 1
    assert "  train: found 3, expected 5 MISMATCH" in out.splitlines()
    assert "  val: missing, expected 2 MISMATCH" in out.splitlines()
    [line] = _errors(err)
    assert "train has 3 images where the release has 5, val is missing" in line
    assert "01_images.zip .. 10_images.zip" in line  # the download to complete
    command = (
        "python -m data_pipelines.build --dataset gta5 --manual_dir <your GTA5 download> "
        f"--data_dir {data_dir}"
    )
    assert line.endswith(
        f"remove {os.path.join(data_dir, 'gta5', 'full')} and rebuild: `{command}`"
    )


def test_the_command_compares_with_the_released_counts(gta, capsys):
    _, data_dir = gta
    released = build.EXPECTED_COUNTS["gta5"]["train"]
    assert released == 24_966  # "Playing for Data": 24,966 frames
    status, out, err = _check(capsys, "--dataset", "gta5", "--data_dir", data_dir)
    assert status == 1
    assert f"  train: found 3, expected {released} MISMATCH" in out.splitlines()
    assert len(_errors(err)) == 1 and f"train has 3 images where the release has {released}" in err


def test_docs_show_the_released_counts():
    with open(DOCS) as f:
        docs = f.read()
    for dataset, splits in build.EXPECTED_COUNTS.items():
        for split, count in splits.items():
            assert f"| `{dataset}` | `{split}` | {count:,} |" in docs, (dataset, split)


def test_not_built_names_the_directory_and_the_build_command(gta, capsys):
    _, data_dir = gta
    status, out, err = _check(capsys, "--dataset", "cityscapes", "--data_dir", data_dir)
    assert status == 2 and out == ""
    assert _errors(err) == [
        f"error: no finished build of cityscapes in {os.path.join(data_dir, 'cityscapes')}; "
        "build it with `python -m data_pipelines.build --dataset cityscapes --manual_dir <your "
        f"Cityscapes download> --data_dir {data_dir} --resize daformer`"
    ]
    # A config that is not built, next to one that is.
    status, out, err = _check(
        capsys, "--dataset", "gta5", "--data_dir", data_dir, "--resize", "daformer"
    )
    assert status == 2 and out == ""
    [line] = _errors(err)
    assert "built there: gta5/full" in line and "--resize daformer`" in line


def test_skipped_files_are_named_as_the_cause(tmp_path, capsys):
    fx.make_gta(str(tmp_path / "gta"))
    bad = tmp_path / "gta" / "images" / "00002.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    args = ("--dataset", "gta5", "--data_dir", str(tmp_path / "out"))
    _build(*args, "--manual_dir", str(tmp_path / "gta"), "--skip_corrupt")
    capsys.readouterr()
    assert build.check(str(tmp_path / "out"), "gta5", table={"gta5": {"train": 3}}) == 1
    out, err = capsys.readouterr()
    assert "  train: found 2, expected 3 MISMATCH" in out.splitlines()
    assert re.search(r"the build skipped 1 unreadable or unlabelled file \(--skip_corrupt", err)


def test_synthetic_shift_counts_follow_its_config(tmp_path, capsys):
    args = ("--dataset", "synthetic_shift", "--data_dir", str(tmp_path))
    size = ("--size", "32x16", "--num_train", "2", "--num_val", "1")
    _build(*args, *size)
    capsys.readouterr()
    status, out, err = _check(capsys, *args, *size)
    assert status == 0 and err == ""
    lines = out.splitlines()[1:]
    assert sorted(lines) == [
        "  source_train: found 2, expected 2 OK",
        "  source_val: found 1, expected 1 OK",
        "  target_train: found 2, expected 2 OK",
        "  target_val: found 1, expected 1 OK",
    ]
    # The named configs' counts come from the builder's own configs.
    assert build.expected_counts("synthetic_shift", "tiny") == {
        "source_train": 12, "source_val": 4, "target_train": 12, "target_val": 4
    }  # fmt: skip
    status, _, err = _check(capsys, *args, "--config", "tiny")
    assert status == 2 and "--config tiny" in err
