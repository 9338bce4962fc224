"""Parity with HF transformers' PyTorch SegFormer, and export that `from_pretrained` loads."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from benchmarks import parity
from pgpc_jax import convert
from pgpc_jax.models.mit import MIT_VARIANTS
from pgpc_jax.models.segmentor import init_variables


@pytest.mark.parametrize("case", sorted(parity.CASES))
def test_features_and_logits_match_hf(case):
    errors = parity.measure(case)
    assert set(errors) == {"stage1", "stage2", "stage3", "stage4", "logits"}
    for name, err in errors.items():
        assert err < 1e-4, f"{case} {name}: relative error {err:.2e}"


def test_export_to_hf_loads_with_from_pretrained_and_gives_same_logits(tmp_path):
    from transformers import SegformerForSemanticSegmentation

    mit = dataclasses.replace(MIT_VARIANTS["b0"], depths=(1, 2, 1, 1))
    ours = parity.ours_like(mit, decoder_dim=64)
    variables = init_variables(ours, jax.random.key(3))
    rng = np.random.default_rng(0)
    variables["batch_stats"] = jax.tree.map(  # non-trivial running statistics
        lambda v: v if v.dtype != np.float32 else rng.uniform(0.5, 1.5, v.shape).astype(np.float32),
        variables["batch_stats"],
    )
    model_cfg = {
        "backbone": "b0",
        "head": "segformer",
        "num_classes": 19,
        "head_embed_dim": 64,
        "head_channels": 256,
        "dropout_rate": 0.1,
        "drop_path_rate": 0.0,
        "layer_norm": "hf",
        "dtype": "float32",
    }
    classes, _ = convert.class_table("cityscapes")
    state = convert.from_flax(variables, "hf")
    convert.write_hf(str(tmp_path), state, model_cfg, classes)
    # write_hf describes the variant by name; this test's MiT is shallower than b0.
    import json

    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["depths"] = list(mit.depths)
    cfg_file.write_text(json.dumps(cfg))

    hf = SegformerForSemanticSegmentation.from_pretrained(str(tmp_path)).eval()
    assert hf.config.id2label[0] == "road" and hf.config.num_labels == 19
    images = rng.normal(size=(1, 70, 90, 3)).astype(np.float32)
    with torch.no_grad():
        ref = (
            hf(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy().transpose(0, 2, 3, 1)
        )
    logits = jax.jit(lambda v, x: ours.apply(v, x, train=False)["logits"])(variables, images)
    assert parity.relative_error(np.asarray(logits), ref) < 1e-4
    # The file holds our tensors bit for bit.
    back = convert.read_state(str(tmp_path))
    assert sorted(back) == sorted(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)
