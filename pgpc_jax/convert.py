"""PyTorch <-> Flax checkpoint conversion (CLI: `python -m pgpc_jax.convert`).

  # PyTorch -> a Flax weights directory for the config's model
  python -m pgpc_jax.convert to-flax --src mit_b5.pth --format mit --config configs/gta2cs.py --out weights/mit_b5
  python -m pgpc_jax.convert to-flax --src latest.pth --format daformer --which ema_model \
      --config configs/gta2cs.py --out weights/daformer_gta
  # Flax weights directory -> PyTorch
  python -m pgpc_jax.convert to-torch --src weights/daformer_gta --format daformer --out daformer_gta.pth
  python -m pgpc_jax.convert to-torch --src weights/segformer --format hf --out hf_segformer/
  # SePiCo's released checkpoints, with their projection head; and back into SePiCo's layout
  python -m pgpc_jax.convert to-flax --src sepico_distcl_gta2city_daformer.pth --format sepico \
      --config configs/gta2cs.py --out weights/sepico_gta
  python -m pgpc_jax.convert to-torch --src weights/sepico_gta --format sepico --out sepico_gta.pth

Formats (see `torch_names.py`): `mit` (NVlabs mit_b*.pth), `mmseg` (mmseg >= 0.17 MiT keys),
`hf` (HF SegFormer file or folder: `.safetensors` or `.bin`), `daformer` (DAFormer / HRDA-style
`state_dict` with `model.` / `ema_model.` / `imnet_model.` prefixes, or bare `backbone.*`,
`decode_head.*`), `sepico` (SePiCo's checkpoints: `daformer`'s layout whose one projection head
is `auxiliary_head.convs.*`, the auxiliary head `projection` here). Every problem (not a
checkpoint, missing / unexpected keys, shape mismatches) is reported before anything is written.

Auxiliary heads (a method's extra heads, `auxiliary_head.<name>.*` as mmseg names them): to-torch
writes the segmentor alone by default, as the originals evaluate it; `--auxiliary_heads=keep`
keeps them (`--format daformer`, and `sepico` for its projection head: `mit`, `mmseg` and `hf`
cannot hold them, and say so). to-flax ignores a checkpoint's `auxiliary_head.*` tensors with a
note, or with `--auxiliary_heads=keep` carries them into the weights directory, where a model
built with those heads reads them (`weights.load_model(..., auxiliary_heads=...)`). For
`--format sepico` the default is keep, both ways: the projection head is what that layout adds
(a SePiCo file without it reads as the segmentor alone, with a note).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Mapping

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from pgpc_jax import checkpointing
from pgpc_jax.cli import parse_flags
from pgpc_jax.config_checks import ConfigError
from pgpc_jax.models import segmentor
from pgpc_jax.torch_names import (
    AUXILIARY,
    AUXILIARY_FORMATS,
    AUXILIARY_OPTIONS,
    FORMATS,
    SEPICO_HEAD,
    WHICH_FORMATS,
    ConversionError,
    auxiliary_head_name,
    auxiliary_to_variables,
    canonical_to_variables,
    check_against,
    has_sepico_head,
    split_auxiliary,
    variables_to_canonical,
)

State = dict[str, np.ndarray]
TORCH_HINT = "reading and writing .pth files needs PyTorch: pip install torch==2.13.0"


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is installed wherever tests run
        raise ConversionError(TORCH_HINT) from e
    return torch


def class_table(name: str) -> tuple[list[str], list[list[int]]]:
    """Class names and RGB palette of a label space (mmseg `meta.CLASSES` / `meta.PALETTE`)."""
    from data_pipelines import labels

    if name != "cityscapes":
        raise ConversionError(f"classes={name!r}: only the 'cityscapes' label space is known")
    return list(labels.CLASSES), [list(c) for c in labels.PALETTE]


# ------------------------------------------------------------------------------------------------
# Files.


def _unwrap(obj: Any, src: str) -> Mapping:
    """The tensor dict inside a loaded checkpoint: `state_dict`, `model` or the object itself."""
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{src} holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def _to_numpy(state: Mapping, src: str) -> State:
    out, bad = {}, []
    for key, value in state.items():
        if hasattr(value, "detach"):  # torch.Tensor
            value = value.detach().cpu()
            if str(value.dtype) == "torch.bfloat16":
                value = value.float()
            out[key] = value.numpy()
        elif isinstance(value, np.ndarray):
            out[key] = value
        else:
            bad.append(f"{key} ({type(value).__name__})")
    if bad:
        raise ConversionError(
            f"{src} is not a state dict of tensors: {len(bad)} non-tensor entries, e.g. {bad[:5]}"
        )
    if not out:
        raise ConversionError(f"{src} holds no tensors")
    return out


def read_state(src: str, unsafe_pickle: bool = False) -> State:
    """Read a PyTorch / safetensors checkpoint (file or HF folder) into a numpy state dict."""
    if os.path.isdir(src):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(src, name)):
                return read_state(os.path.join(src, name), unsafe_pickle)
        raise ConversionError(f"{src} is a folder without model.safetensors or pytorch_model.bin")
    if not os.path.isfile(src):
        raise ConversionError(f"{src}: no such file")
    if src.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(src)
        except Exception as e:
            raise ConversionError(f"{src} is not a readable safetensors file ({e})") from e
    torch = _torch()
    try:
        obj = torch.load(src, map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as e:
        hint = (
            ""
            if unsafe_pickle or "weights_only" not in str(e)
            else " It pickles objects beyond tensors; if you trust its source, add --unsafe_pickle."
        )
        raise ConversionError(
            f"{src} is not a PyTorch checkpoint ({type(e).__name__}).{hint}"
        ) from e
    return _to_numpy(_unwrap(obj, src), src)


def write_torch(path: str, state: State, meta: Mapping | None, legacy: bool) -> None:
    """torch.save a state dict, wrapped as mmcv does (`state_dict` + `meta`) when meta is given.
    `legacy` writes the pre-1.6 non-zip serialisation that old PyTorch readers need."""
    torch = _torch()
    # Writable copies: torch warns on (and may not own) read-only arrays such as device_get's.
    tensors = {k: torch.from_numpy(np.array(v, order="C")) for k, v in state.items()}
    obj = {"state_dict": tensors, "meta": dict(meta)} if meta is not None else tensors
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def hf_config(model_cfg: Mapping, classes: list[str]) -> dict:
    """HF `SegformerConfig` fields for a MiT + SegFormer-head model."""
    mit = segmentor.build_segmentor(model_cfg).backbone
    return {
        "architectures": ["SegformerForSemanticSegmentation"],
        "model_type": "segformer",
        "num_channels": 3,
        "num_encoder_blocks": 4,
        "depths": list(mit.depths),
        "sr_ratios": list(mit.sr_ratios),
        "hidden_sizes": list(mit.embed_dims),
        "patch_sizes": [7, 3, 3, 3],
        "strides": [4, 2, 2, 2],
        "num_attention_heads": list(mit.num_heads),
        "mlp_ratios": [mit.mlp_ratio] * 4,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout_prob": model_cfg["dropout_rate"],
        "drop_path_rate": model_cfg["drop_path_rate"],
        "layer_norm_eps": 1e-6,
        "decoder_hidden_size": model_cfg["head_embed_dim"],
        "semantic_loss_ignore_index": 255,
        "reshape_last_stage": True,
        "num_labels": len(classes),
        "id2label": {str(i): c for i, c in enumerate(classes)},
        "label2id": {c: i for i, c in enumerate(classes)},
    }


def write_hf(path: str, state: State, model_cfg: Mapping, classes: list[str]) -> None:
    """A folder that `SegformerForSemanticSegmentation.from_pretrained(path)` loads."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    save_file(
        {k: np.asarray(v, order="C") for k, v in state.items()},
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(model_cfg, classes), f, indent=2)


# ------------------------------------------------------------------------------------------------
# Conversions.


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _heads(names) -> str:
    names = sorted(names)
    return f"auxiliary head{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}"


def _ignored(src: str, names, count: int) -> str:
    return (
        f"{src}: ignored its {_heads(names)} ({count} tensors), which the model does not have: "
        "the segmentor alone is read"
    )


def fit_canonical(
    canonical: Mapping[str, np.ndarray],
    model: segmentor.Segmentor,
    src: str,
    missing_auxiliary: str = "error",
    extra_auxiliary: str = "drop",
    note: Callable[[str], None] = _note,
) -> tuple[dict, list[str]]:
    """A canonical state dict -> the variables of `model`, auxiliary heads reconciled.

    Auxiliary heads of the checkpoint that the model lacks are left out with one note (a SePiCo /
    mmseg checkpoint evaluates with the plain segmentor), or with `extra_auxiliary='keep'`
    carried along (`torch_names.auxiliary_to_variables`). A model head the checkpoint lacks is
    an error naming it, or with `missing_auxiliary='init'` keeps its initialisation (a note).

    Returns:
      (variables, left_to_init): the Flax variables (numpy) and the `decode_head.*` keys left to
      their initialisation (an encoder-only checkpoint).
    """
    if extra_auxiliary not in AUXILIARY_OPTIONS:
        raise ConversionError(
            f"--auxiliary_heads={extra_auxiliary!r}: expected one of {AUXILIARY_OPTIONS}"
        )
    template = segmentor.abstract_variables(model)
    canonical, extra = split_auxiliary(canonical, [name for name, _ in model.auxiliary_heads])
    left = check_against(canonical, template, src, missing_auxiliary)
    if left:
        init = jax.tree.map(np.asarray, segmentor.init_variables(model, jax.random.key(0)))
        initial = variables_to_canonical(init)
        canonical = {**{k: initial[k] for k in left}, **canonical}
    variables = canonical_to_variables(canonical, template)
    if extra:
        count = sum(len(head) for head in extra.values())
        if extra_auxiliary == "keep":
            kept = auxiliary_to_variables(
                {k: v for head in extra.values() for k, v in head.items()}
            )
            for collection, tree in kept.items():
                variables.setdefault(collection, {}).setdefault(AUXILIARY, {}).update(
                    tree[AUXILIARY]
                )
            note(f"{src}: kept its {_heads(extra)} ({count} tensors) beside the segmentor")
        else:
            note(_ignored(src, extra, count))
    fresh = {auxiliary_head_name(k) for k in left} - {None}
    if fresh:
        note(f"{src} has no {_heads(fresh)}: it keeps its initialisation")
    return variables, [k for k in left if auxiliary_head_name(k) is None]


def fit_variables(
    variables: Mapping,
    model: segmentor.Segmentor,
    src: str,
    missing_auxiliary: str = "error",
    note: Callable[[str], None] = _note,
) -> dict:
    """The variables of a weights directory or a run, with whatever auxiliary heads they hold
    -> those of `model`, as `fit_canonical` reconciles them (unchanged where neither has any)."""
    stored = auxiliary_head_names(variables)
    if not model.auxiliary_heads:
        if stored:
            count = sum(
                len(jax.tree.leaves(dict(t).get(AUXILIARY, {}))) for t in variables.values()
            )
            note(_ignored(src, stored, count))
        return without_auxiliary(variables)
    canonical = variables_to_canonical(variables)
    return fit_canonical(canonical, model, src, missing_auxiliary, "drop", note)[0]


def to_flax(
    src: str,
    fmt: str,
    model_cfg: Mapping,
    which: str = "model",
    unsafe_pickle=False,
    *,
    auxiliary_heads: Mapping[str, Any] | None = None,
    missing_auxiliary: str = "error",
    extra_auxiliary: str = "drop",
    note: Callable[[str], None] = _note,
):
    """Read `src` in format `fmt` as variables of the model `model_cfg`.

    Args:
      auxiliary_heads: the model's auxiliary heads ({name: unbound module}, as
        `segmentor.build_segmentor` takes them), read from `auxiliary_head.<name>.*`.
      missing_auxiliary: 'error' (a one-line error naming a head the file lacks) or 'init'
        (the head keeps its initialisation).
      extra_auxiliary: 'drop' (the file's other auxiliary heads are ignored, with a note) or
        'keep' (carried into the variables).
      note: called with each note line (default: `note: ...` on stderr).

    Returns (variables, left_to_init): the Flax variables (numpy) and the canonical keys that the
    checkpoint did not provide and keep their initialisation (the head, for an encoder-only file).
    """
    if fmt not in FORMATS:
        raise ConversionError(f"--format={fmt!r}: expected one of {sorted(FORMATS)}")
    state = read_state(src, unsafe_pickle)
    to_canonical = FORMATS[fmt][0]
    canonical = to_canonical(state, which) if fmt in WHICH_FORMATS else to_canonical(state)
    model = segmentor.build_segmentor(model_cfg, auxiliary_heads)
    if fmt == "sepico" and not has_sepico_head(canonical):
        wanted = SEPICO_HEAD in dict(model.auxiliary_heads)
        if wanted and missing_auxiliary == "error":
            raise ConversionError(
                f"{src} has no SePiCo projection head (no auxiliary_head.* key): use a SePiCo "
                "checkpoint that holds it, or start the head from its initialisation "
                "(missing_auxiliary='init')"
            )
        if not wanted:
            note(
                f"{src} has no SePiCo projection head (no auxiliary_head.* key): the segmentor "
                "alone is read"
            )
    try:
        return fit_canonical(canonical, model, src, missing_auxiliary, extra_auxiliary, note)
    except ConversionError as e:
        if fmt == "daformer" and any(k.startswith(_SEPICO_KEYS) for k in canonical):
            raise ConversionError(
                f"{e}; its auxiliary_head.convs.* keys are SePiCo's projection head: read it "
                "with --format sepico"
            ) from e
        raise


# SePiCo's projection head as a `daformer` reader sees it (two heads `convs_0`, `convs_1`).
_SEPICO_KEYS = "auxiliary_head.convs."


_NO_AUXILIARY = {  # why a format cannot hold auxiliary heads
    "mit": "NVlabs MiT keys: the encoder alone",
    "mmseg": "mmseg MiT keys: the encoder alone",
    "hf": "HF SegFormer, which has no auxiliary head",
}


def default_auxiliary(fmt: str) -> str:
    """`--auxiliary_heads` left unset: keep for `sepico` (its layout is the segmentor with its
    projection head), drop for the others (the segmentor alone, as the originals evaluate it)."""
    return "keep" if fmt == "sepico" else "drop"


def check_auxiliary_option(fmt: str, auxiliary_heads: str | None) -> None:
    """Fail (one line) where `--auxiliary_heads` is not drop / keep (or None, the format's
    default), or keep asks a format that cannot hold auxiliary heads ('flax', a weights
    directory, holds any variables)."""
    if auxiliary_heads is None:
        return
    if auxiliary_heads not in AUXILIARY_OPTIONS:
        raise ConversionError(
            f"--auxiliary_heads={auxiliary_heads!r}: expected one of {AUXILIARY_OPTIONS}"
        )
    if auxiliary_heads == "keep" and fmt not in (*AUXILIARY_FORMATS, "flax"):
        raise ConversionError(
            f"--auxiliary_heads=keep: --format {fmt} ({_NO_AUXILIARY.get(fmt, fmt)}) cannot hold "
            "auxiliary heads; keep them with --format daformer (or sepico, for SePiCo's projection "
            "head), or leave them out (drop)"
        )


def auxiliary_head_names(variables: Mapping) -> list[str]:
    """The auxiliary heads ({'params', 'batch_stats'} under `auxiliary_head/<name>`) of variables."""
    return sorted({n for tree in variables.values() for n in dict(tree).get(AUXILIARY, {})})


def without_auxiliary(variables: Mapping) -> dict:
    """The variables of the segmentor alone (every collection without `auxiliary_head`)."""
    return {c: {k: v for k, v in dict(t).items() if k != AUXILIARY} for c, t in variables.items()}


def auxiliary_note(variables: Mapping, fmt: str, auxiliary_heads: str) -> list[str]:
    """The note of an export that leaves the variables' auxiliary heads out (none otherwise)."""
    names = auxiliary_head_names(variables)
    if not names or auxiliary_heads == "keep":
        return []
    hint = "; --auxiliary_heads=keep keeps them" if fmt in (*AUXILIARY_FORMATS, "flax") else ""
    return [f"note: left out the {_heads(names)}, as the originals evaluate without them{hint}"]


def from_flax(variables: Mapping, fmt: str, auxiliary_heads: str | None = "drop") -> State:
    """Flax variables -> a state dict in format `fmt` (numpy): the segmentor, and with
    `auxiliary_heads='keep'` the auxiliary heads (daformer: `auxiliary_head.<name>.*`; sepico:
    the head `projection` as `auxiliary_head.*`, another head is an error). None: the format's
    default (`default_auxiliary`)."""
    if fmt not in FORMATS:
        raise ConversionError(f"--format={fmt!r}: expected one of {sorted(FORMATS)}")
    check_auxiliary_option(fmt, auxiliary_heads)
    if auxiliary_heads is None:
        auxiliary_heads = default_auxiliary(fmt)
    canonical = variables_to_canonical(variables)
    if auxiliary_heads == "drop":
        canonical, _ = split_auxiliary(canonical)
    return FORMATS[fmt][1](canonical)


def _stored_auxiliary(path: str) -> dict:
    """{collection: its `auxiliary_head` subtree} of a weights directory, as ShapeDtypeStructs
    from orbax's metadata ({} for the segmentor alone, or where the metadata cannot be read:
    `checkpointing.load_variables` then says what is wrong)."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as ckptr:
            metadata = ckptr.metadata(checkpointing.run_path(path) / checkpointing.VARIABLES_DIR)
    except Exception:  # orbax raises several types for a damaged directory
        return {}
    tree = getattr(metadata, "item_metadata", metadata)
    tree = dict(getattr(tree, "tree", tree))
    return {
        c: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(sub)[AUXILIARY])
        for c, sub in tree.items()
        if AUXILIARY in dict(sub)
    }


def load_weights_dir(path: str) -> tuple[dict, dict, dict]:
    """A Flax weights directory -> (variables, model config dict, meta). The variables hold the
    directory's auxiliary heads if it has any (`export --auxiliary_heads=keep`)."""
    info = checkpointing.read_model_file(path)
    model = segmentor.build_segmentor(info["model"])
    template = {c: dict(t) for c, t in segmentor.abstract_variables(model).items()}
    for collection, heads in _stored_auxiliary(path).items():
        template.setdefault(collection, {})[AUXILIARY] = heads
    variables = checkpointing.load_variables(path, template)
    return variables, info["model"], info.get("meta", {})


# ------------------------------------------------------------------------------------------------
# CLI.

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a program, so importing stays side-effect free."""
    flags.DEFINE_string(
        "src",
        None,
        "Input checkpoint: a .pth/.bin/.safetensors file, a HF folder, or a Flax weights directory (to-torch).",
    )
    flags.DEFINE_enum("format", None, sorted(FORMATS), "Checkpoint format on the PyTorch side.")
    flags.DEFINE_enum(
        "which",
        "model",
        ["model", "ema_model", "imnet_model"],
        "DAFormer / SePiCo sub-model to read: the student (as DAFormer evaluates), the EMA "
        "teacher, or DAFormer's ImageNet copy.",
    )
    flags.DEFINE_string(
        "out",
        None,
        "Output: a Flax weights directory (to-flax), a .pth file or an HF folder (to-torch).",
    )
    flags.DEFINE_bool(
        "legacy_serialization",
        False,
        "to-torch: write the pre-1.6 non-zip format for old PyTorch readers (DAFormer's torch 1.7 environment).",
    )
    flags.DEFINE_enum(
        "auxiliary_heads",
        None,
        list(AUXILIARY_OPTIONS),
        "A method's auxiliary heads (auxiliary_head.*). to-torch: drop writes the segmentor alone "
        "(as the originals evaluate it), keep writes them too (--format daformer, or sepico for "
        "its projection head). to-flax: drop ignores the checkpoint's auxiliary_head.* tensors "
        "(a note), keep carries them into the weights directory. Default: keep for sepico, drop "
        "otherwise.",
    )
    flags.DEFINE_bool(
        "unsafe_pickle",
        False,
        "to-flax: allow checkpoints that pickle objects beyond tensors (only for files you trust).",
    )
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config whose `model` group describes the model (to-flax).",
        lock_config=True,
    )


COMMANDS = ("to-flax", "to-torch")


def _run(argv: list[str]) -> None:
    from pgpc_jax import class_set  # the trainer's class sets; this module stays low-level

    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"expected one command, {' or '.join(COMMANDS)}; got {argv[1:]}")
    if not FLAGS.src or not FLAGS.format or not FLAGS.out:
        raise app.UsageError("--src, --format and --out are required")
    if argv[1] == "to-flax":
        if FLAGS.config is None:
            raise app.UsageError("to-flax needs --config (its `model` group gives the model shape)")
        model_cfg = FLAGS.config.model.to_dict()
        if FLAGS.config.get("classes") == "data" and not FLAGS.config.get("class_names"):
            raise ConversionError(
                "--config has classes='data' and names no classes: give the class names and "
                "count the checkpoint was trained with, --config.class_names='(\"a\", ...)' "
                "--config.model.num_classes=K"
            )
        variables, left = to_flax(
            FLAGS.src,
            FLAGS.format,
            model_cfg,
            FLAGS.which,
            FLAGS.unsafe_pickle,
            extra_auxiliary=FLAGS.auxiliary_heads or default_auxiliary(FLAGS.format),
        )
        meta = {
            "source": os.path.abspath(FLAGS.src),
            "format": FLAGS.format,
            "which": FLAGS.which,
            **class_set.meta_fields(FLAGS.config),
        }
        checkpointing.save_variables(FLAGS.out, variables, model_cfg, meta)
        print(
            f"wrote {FLAGS.out} ({len(variables_to_canonical(variables))} tensors from {FLAGS.src})"
        )
        if left:
            print(
                f"the checkpoint has no decode head: {len(left)} head tensors keep their "
                "initialisation (an encoder-only checkpoint, e.g. ImageNet MiT)"
            )
        return
    auxiliary_heads = FLAGS.auxiliary_heads or default_auxiliary(FLAGS.format)
    check_auxiliary_option(FLAGS.format, auxiliary_heads)
    variables, model_cfg, meta = load_weights_dir(FLAGS.src)
    state = from_flax(variables, FLAGS.format, auxiliary_heads)
    classes, palette = class_set.names_and_colors(meta)
    palette = [list(c) for c in palette]
    if FLAGS.format == "hf":
        write_hf(FLAGS.out, state, model_cfg, classes)
    else:
        mmcv = FLAGS.format in WHICH_FORMATS  # DAFormer / SePiCo: mmcv's {'state_dict', 'meta'}
        wrap = {"CLASSES": tuple(classes), "PALETTE": palette} if mmcv else None
        write_torch(FLAGS.out, state, wrap, FLAGS.legacy_serialization)
    print(f"wrote {FLAGS.out} ({len(state)} tensors, format {FLAGS.format})")
    for line in auxiliary_note(variables, FLAGS.format, auxiliary_heads):
        print(line)
    if FLAGS.format == "sepico" and auxiliary_heads == "keep":
        if SEPICO_HEAD not in auxiliary_head_names(variables):
            print(
                f"note: {FLAGS.src} has no projection head ({AUXILIARY}/{SEPICO_HEAD}): wrote the "
                "segmentor alone"
            )


def main(argv: list[str]) -> None:
    if not FLAGS["verbosity"].present:  # orbax logs every step of a checkpoint read at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        _run(argv)
    except (ConversionError, ConfigError, checkpointing.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """The `pgpc-convert` command (`python -m pgpc_jax.convert`)."""
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
