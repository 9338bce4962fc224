"""Reading builds: the message for a dataset that is not built, and for a split it does not have."""

import os

import data_fixtures as fx
import pytest

from data_pipelines import build, sources

DOCS = "(see docs/data.md for the layout)"
COMMAND = "python -m data_pipelines.build --dataset"


@pytest.mark.parametrize(
    "dataset, command",
    [
        ("gta5/daformer", "gta5 --manual_dir <your GTA5 download> --data_dir {d} --resize daformer"),
        ("cityscapes/full", "cityscapes --manual_dir <your Cityscapes download> --data_dir {d}"),
        ("synthia/1280x760", "synthia --manual_dir <your SYNTHIA-RAND-CITYSCAPES download> "
                             "--data_dir {d} --resize 1280x760"),
        ("dark_zurich/daformer/1.0.0", "dark_zurich --manual_dir <your Dark Zurich download> "
                                       "--data_dir {d} --resize daformer"),
        ("folder/mine", "folder --name mine --manual_dir <your folder> --data_dir {d}"),
        ("folder/mine_512x256",
         "folder --name mine --manual_dir <your folder> --data_dir {d} --resize 512x256"),
        ("synthetic_shift/default", "synthetic_shift --data_dir {d}"),
        ("synthetic_shift/mild", "synthetic_shift --data_dir {d} --config mild"),
        # synthetic_config names are HxW, --size is WxH.
        ("synthetic_shift/64x128_n12_v4_s3_k0.5", "synthetic_shift --data_dir {d} --size 128x64 "
                                                  "--num_train 12 --num_val 4 --seed 3 "
                                                  "--shift_strength 0.5"),
    ],
)  # fmt: skip
def test_not_built_gives_the_command_that_builds_it(tmp_path, dataset, command):
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(sources.DatasetNotBuiltError) as raised:
        sources.open_split(data_dir, dataset, "train")
    assert isinstance(raised.value, FileNotFoundError)  # pgpc_jax.main catches that
    path = os.path.join(data_dir, dataset)
    assert str(raised.value) == (
        f"no built dataset {dataset!r} at {path}; the data_dir {data_dir} does not exist; "
        f"build it with `{COMMAND} {command.format(d=data_dir)}` {DOCS}"
    )


def test_not_built_says_whether_data_dir_is_empty_or_what_it_holds(tmp_path):
    data_dir = str(tmp_path)
    with pytest.raises(sources.DatasetNotBuiltError, match=f"; the data_dir {data_dir} is empty;"):
        sources.dataset_dir(data_dir, "gta5/daformer")
    fx.make_gta(str(tmp_path / "gta"))
    assert build.main(["--dataset", "gta5", "--manual_dir", str(tmp_path / "gta"),
                       "--data_dir", data_dir]) == 0  # fmt: skip
    with pytest.raises(sources.DatasetNotBuiltError) as raised:
        sources.dataset_dir(data_dir, "gta5/daformer")
    assert "; built there: gta5/full; build it with" in str(raised.value)
    (tmp_path / "gta5" / "full" / "1.0.0.incomplete.X").mkdir()  # a killed build's leftover
    (tmp_path / "gta5" / "full" / "1.0.0.incomplete.X" / "dataset_info.json").write_text("{}")
    assert sources.dataset_dir(data_dir, "gta5/full") == str(tmp_path / "gta5" / "full" / "1.0.0")
    with pytest.raises(sources.UnknownSplitError) as raised:
        sources.open_split(data_dir, "gta5/full", "val")
    assert isinstance(raised.value, ValueError)
    assert (
        str(raised.value)
        == f"{tmp_path / 'gta5' / 'full' / '1.0.0'} has splits ['train'], not 'val'"
    )
