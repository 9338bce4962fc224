"""PyTorch state-dict naming: Flax variables <-> one canonical torch naming <-> each file format.

The canonical naming is DAFormer's EncoderDecoder: `backbone.<NVlabs MiT key>` and
`decode_head.<mmseg head key>` (e.g. `backbone.block3.17.attn.kv.weight`,
`decode_head.fuse_layer.aspp_modules.1.depthwise_conv.bn.running_var`). Our Flax modules carry the
same names (a list index `.17` is `_17`), so Flax <-> canonical is one mechanical rule plus the
tensor layout (Linear transposed, Conv OIHW <-> HWIO). Every format is then a pure rename of the
canonical dict, written both ways so that a round trip reproduces each tensor bit for bit:

* `mit`: the NVlabs `mit_b*.pth` (flat MiT keys; its ImageNet `head.*` classifier is dropped);
* `mmseg`: mmseg >= 0.17 MiT keys (`layers.{i}.{0,1,2}`, q and kv fused into `in_proj`, the FFN
  Linears stored as 1x1 convs), from `tools/model_converters/mit2mmseg.py`;
* `hf`: HF transformers SegFormer with the legacy names that `save_pretrained` and the hub use
  (`segformer.encoder.*`, `decode_head.linear_c.*`), k and v split; transformers-5 in-memory names
  (`segformer.stages.*`) are accepted on input;
* `daformer`: the canonical names under a `model.` / `ema_model.` / `imnet_model.` prefix;
* `sepico`: SePiCo's checkpoints (BIT-DA/SePiCo, an `EncoderDecoderProjector` inside the
  `SePiCo` UDA module): `daformer`'s names, with its single projection head stored without a
  name level, `auxiliary_head.convs.{0,1}.conv.weight`, `auxiliary_head.convs.{0,1}.bn.*`;
  here it is the auxiliary head `projection` (`SEPICO_HEAD`).

A method's auxiliary heads (`models/segmentor.py`, Flax `auxiliary_head/<name>/...`) follow the
same rule: `auxiliary_head.<name>.<module path>.<leaf>`, mmseg's `auxiliary_head.*` with one
level per head. Only `daformer`, `sepico` (its projection head only) and a Flax weights
directory can hold them; `mit`, `mmseg` and `hf` are an encoder or a SegFormer, so writers drop
them unless asked to keep them (`AUXILIARY_OPTIONS`), and a format that cannot keep them says so.

Everything here is numpy; reading and writing files lives in `convert.py`.
"""

from __future__ import annotations

import re
from typing import Callable, Collection, Mapping

import numpy as np
from flax import traverse_util

State = dict[str, np.ndarray]

# Flax leaf name -> torch leaf name, per collection.
_PARAM_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STAT_LEAVES = {
    "mean": "running_mean",
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}


# The Flax module and torch prefix of a method's extra heads (mmseg's `auxiliary_head`).
AUXILIARY = "auxiliary_head"
# Writers: leave a model's auxiliary heads out (the segmentor alone, as the originals evaluate
# it) or keep them. Readers, for a model head the file lacks: fail, or keep its initialisation.
AUXILIARY_OPTIONS = ("drop", "keep")
MISSING_AUXILIARY = ("error", "init")
# The formats that can hold `auxiliary_head.*` keys; the others are an encoder or a SegFormer.
AUXILIARY_FORMATS = ("daformer", "sepico")
# The auxiliary head that SePiCo's checkpoints hold (as `auxiliary_head.*`, no name level): the
# projection head (`models.heads.ProjectionHead`), under this name in a model.
SEPICO_HEAD = "projection"


class ConversionError(ValueError):
    """A checkpoint does not fit the requested format or model. The message says what to do."""


def _torch_module_path(names: tuple[str, ...]) -> str:
    # Flax `block3_17` / `aspp_modules_1` are torch `block3.17` / `aspp_modules.1`.
    return ".".join(re.sub(r"_(\d+)$", r".\1", n) for n in names)


def _flax_module_path(path: str) -> tuple[str, ...]:
    parts, out = path.split("."), []
    for p in parts:
        if p.isdigit() and out:
            out[-1] = f"{out[-1]}_{p}"
        else:
            out.append(p)
    return tuple(out)


def _to_torch_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:  # Dense (in, out) -> Linear (out, in)
        return np.ascontiguousarray(x.T)
    if x.ndim == 4:  # Conv (kh, kw, in/g, out) -> Conv2d (out, in/g, kh, kw)
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return x


def _to_flax_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return np.ascontiguousarray(x.T)
    if x.ndim == 4:
        return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    return x


def _canonical_key(path: tuple[str, ...], leaves: Mapping[str, str]) -> str:
    # A leaf without a torch counterpart (a method's own `self.param`) keeps its name, as torch
    # names an `nn.Parameter` by its attribute.
    return f"{_torch_module_path(path[:-1])}.{leaves.get(path[-1], path[-1])}"


def variables_to_canonical(variables: Mapping) -> State:
    """Flax variables {'params', 'batch_stats'} -> canonical torch state dict (numpy arrays)."""
    out: State = {}
    for collection, leaves in (("params", _PARAM_LEAVES), ("batch_stats", _STAT_LEAVES)):
        flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
        for path, value in flat.items():
            key = _canonical_key(path, leaves)
            value = np.asarray(value)
            if path[-1] == "num_batches_tracked":
                value = value.astype(np.int64)
            out[key] = _to_torch_layout(value) if path[-1] == "kernel" else value
    return out


def canonical_layout(template: Mapping) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """For each canonical key of a model: (collection, flax path, torch shape)."""
    layout = {}
    for collection, leaves in (("params", _PARAM_LEAVES), ("batch_stats", _STAT_LEAVES)):
        flat = traverse_util.flatten_dict(dict(template.get(collection, {})))
        for path, value in flat.items():
            key = _canonical_key(path, leaves)
            shape = tuple(value.shape)
            if path[-1] == "kernel":
                shape = _to_torch_layout(np.empty(shape, np.bool_)).shape
            if key in layout:  # e.g. a module's `kernel` and a custom `weight` parameter
                raise ConversionError(
                    f"{'/'.join(layout[key][1])} and {'/'.join(path)} both have the torch name "
                    f"{key}: rename one of the Flax variables"
                )
            layout[key] = (collection, path, shape)
    return layout


def canonical_to_variables(state: Mapping[str, np.ndarray], template: Mapping) -> dict:
    """Canonical torch state dict -> Flax variables shaped like `template` (arrays or
    ShapeDtypeStructs). The caller has checked keys and shapes (`check_against`)."""
    layout = canonical_layout(template)
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, (collection, path, _) in layout.items():
        value = np.asarray(state[key])
        if path[-1] == "kernel":
            value = _to_flax_layout(value)
        elif path[-1] == "num_batches_tracked":
            value = value.astype(np.int32)
        trees[collection][path] = value
    return {c: traverse_util.unflatten_dict(t) for c, t in trees.items() if t}


def auxiliary_head_name(key: str) -> str | None:
    """The Flax name of the auxiliary head that a canonical key belongs to, None outside them:
    `auxiliary_head.proj.Conv.0.weight` -> 'proj', `auxiliary_head.proj.2.bias` -> 'proj_2'."""
    if not key.startswith(AUXILIARY + "."):
        return None
    return _flax_module_path(key[len(AUXILIARY) + 1 :])[0]


def auxiliary_prefix(name: str) -> str:
    """The canonical key prefix of the auxiliary head `name` ('proj_2' -> 'auxiliary_head.proj.2.')."""
    return f"{_torch_module_path((AUXILIARY, name))}."


def split_auxiliary(state: Mapping, keep: Collection[str] = ()) -> tuple[State, dict[str, State]]:
    """Split a canonical state dict into (the segmentor and the auxiliary heads named in `keep`,
    {every other auxiliary head: its keys})."""
    kept: State = {}
    others: dict[str, State] = {}
    for key, value in state.items():
        name = auxiliary_head_name(key)
        if name is None or name in keep:
            kept[key] = value
        else:
            others.setdefault(name, {})[key] = value
    return kept, others


def auxiliary_to_variables(state: Mapping[str, np.ndarray]) -> dict:
    """Canonical `auxiliary_head.*` keys -> Flax variables without a model to shape them.

    The inverse of the mechanical rule, read off the tensors: a `weight` of 2 or more dims is a
    Dense / Conv `kernel` (transposed), one of 1 dim a norm `scale`; `running_*` and
    `num_batches_tracked` are batch statistics; any other leaf keeps its name. A conversion keeps
    a file's auxiliary heads this way (`convert to-flax --auxiliary_heads=keep`) for a model
    whose method builds them.
    """
    stat_leaves = {v: k for k, v in _STAT_LEAVES.items()}
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, value in state.items():
        if auxiliary_head_name(key) is None:
            raise ConversionError(f"{key!r} is not an {AUXILIARY}.* key")
        module, leaf = key.rsplit(".", 1)
        value = np.asarray(value)
        collection = "batch_stats" if leaf in stat_leaves else "params"
        if leaf in stat_leaves:
            leaf = stat_leaves[leaf]
            if leaf == "num_batches_tracked":
                value = value.astype(np.int32)
        elif leaf == "weight":
            leaf = "kernel" if value.ndim >= 2 else "scale"
            value = _to_flax_layout(value) if leaf == "kernel" else value
        trees[collection][(*_flax_module_path(module), leaf)] = value
    return {c: traverse_util.unflatten_dict(t) for c, t in trees.items() if t}


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)}: {shown}{more}"


def check_against(
    state: Mapping[str, np.ndarray],
    template: Mapping,
    src: str,
    missing_auxiliary: str = "error",
) -> list[str]:
    """Check a canonical state dict against a model; return the keys left to initialisation.

    An encoder-only checkpoint (no `decode_head.*` key) is accepted: the head keeps its
    initialisation. An auxiliary head of the model of which the checkpoint has no key is a
    one-line `ConversionError` naming it, or with `missing_auxiliary='init'` keeps its
    initialisation too (training's `init_from`). Anything else missing, any unexpected key and
    any shape mismatch raises a `ConversionError` listing the offending keys (the first few and a
    count).
    """
    if missing_auxiliary not in MISSING_AUXILIARY:
        raise ConversionError(
            f"missing_auxiliary={missing_auxiliary!r}: expected one of {MISSING_AUXILIARY}"
        )
    layout = canonical_layout(template)
    expected, given = set(layout), set(state)
    missing, unexpected = expected - given, given - expected
    problems = []
    head_only_missing = not any(k.startswith("decode_head.") for k in given)
    init_only = sorted(k for k in missing if head_only_missing and k.startswith("decode_head."))
    given_heads = {auxiliary_head_name(k) for k in given}
    absent = sorted({auxiliary_head_name(k) for k in expected} - given_heads - {None})
    absent_keys = {k for k in missing if auxiliary_head_name(k) in absent}
    if absent and missing_auxiliary == "error":
        names = ", ".join(f"{n!r} (no {auxiliary_prefix(n)}* key)" for n in absent)
        problems.append(
            f"{src} has no auxiliary head {names} of the model: use a checkpoint that holds it, "
            "or start it from its initialisation (missing_auxiliary='init')"
        )
    else:
        init_only += sorted(absent_keys)
    missing -= set(init_only) | absent_keys
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    bad = [
        f"{k}: checkpoint {tuple(np.shape(state[k]))} vs model {layout[k][2]}"
        for k in sorted(expected & given)
        if tuple(np.shape(state[k])) != layout[k][2]
    ]
    if bad:
        more = f" ... and {len(bad) - 8} more" if len(bad) > 8 else ""
        problems.append(f"shape mismatches {len(bad)}: " + "; ".join(bad[:8]) + more)
    if len(problems) == 1 and absent and missing_auxiliary == "error":
        raise ConversionError(problems[0])  # the file fits but for the head: one line
    if problems:
        raise ConversionError(
            f"{src} does not fit the model of this config:\n  "
            + "\n  ".join(problems)
            + "\nCheck --format and the config's model (backbone variant, head, num_classes)."
        )
    return init_only


# ------------------------------------------------------------------------------------------------
# Formats. Each is (to_canonical, from_canonical) over plain {key: np.ndarray} dicts.


def _prefixed(state: Mapping, prefix: str) -> State:
    return {prefix + k: v for k, v in state.items()}


def _strip(state: Mapping, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def mit_to_canonical(state: Mapping) -> State:
    """NVlabs mit_b*.pth -> canonical. The ImageNet classifier `head.*` is dropped."""
    return {f"backbone.{k}": v for k, v in state.items() if not k.startswith("head.")}


def mit_from_canonical(state: Mapping) -> State:
    return _strip(state, "backbone.")


_MMSEG_RULES = [  # (NVlabs pattern, mmseg template); applied to one key at a time
    (r"^patch_embed(\d)\.proj\.", "layers.{s}.0.projection."),
    (r"^patch_embed(\d)\.norm\.", "layers.{s}.0.norm."),
    (r"^block(\d)\.(\d+)\.attn\.proj\.", "layers.{s}.1.{j}.attn.attn.out_proj."),
    (r"^block(\d)\.(\d+)\.mlp\.fc1\.", "layers.{s}.1.{j}.ffn.layers.0."),
    (r"^block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.", "layers.{s}.1.{j}.ffn.layers.1."),
    (r"^block(\d)\.(\d+)\.mlp\.fc2\.", "layers.{s}.1.{j}.ffn.layers.4."),
    (r"^block(\d)\.(\d+)\.", "layers.{s}.1.{j}."),  # norm1, norm2, attn.sr, attn.norm
    (r"^norm(\d)\.", "layers.{s}.2."),
]


def _mmseg_key(key: str) -> str:
    for pattern, template in _MMSEG_RULES:
        m = re.match(pattern, key)
        if m:
            groups = m.groups()
            new = template.format(s=int(groups[0]) - 1, j=groups[1] if len(groups) > 1 else "")
            return new + key[m.end() :]
    raise ConversionError(f"no mmseg name for MiT key {key!r}")


def mmseg_from_canonical(state: Mapping) -> State:
    mit = mit_from_canonical(state)
    out: State = {}
    for key, value in mit.items():
        if ".attn.kv." in key:
            continue  # fused into in_proj together with q
        m = re.match(r"^block(\d)\.(\d+)\.attn\.q\.(weight|bias)$", key)
        if m:  # mmseg's nn.MultiheadAttention holds [q; k; v] in one in_proj
            kv = mit[key.replace(".attn.q.", ".attn.kv.")]
            new = f"layers.{int(m.group(1)) - 1}.1.{m.group(2)}.attn.attn.in_proj_{m.group(3)}"
            out[new] = np.concatenate([value, kv], axis=0)
            continue
        new = _mmseg_key(key)
        if (".mlp.fc1.weight" in key or ".mlp.fc2.weight" in key) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


def mmseg_to_canonical(state: Mapping) -> State:
    """mmseg >= 0.17 MiT keys (optionally under `backbone.`) -> canonical."""
    if any(k.startswith("backbone.") for k in state):
        state = _strip(state, "backbone.")
    out: State = {}
    for key, value in state.items():
        m = re.match(r"^layers\.(\d)\.(\d)\.(.*)$", key)
        if not m:
            raise ConversionError(
                f"{key!r} is not an mmseg MiT key (expected layers.<i>.<0|1|2>...)"
            )
        stage, part, rest = int(m.group(1)) + 1, int(m.group(2)), m.group(3)
        if part == 0:
            rest = rest.replace("projection.", "proj.", 1)
            out[f"patch_embed{stage}.{rest}"] = value
        elif part == 2:
            out[f"norm{stage}.{rest}"] = value
        else:
            j, rest = rest.split(".", 1)
            prefix = f"block{stage}.{j}."
            if rest.startswith("attn.attn.in_proj_"):
                leaf = rest[len("attn.attn.in_proj_") :]
                c = value.shape[0] // 3
                out[prefix + f"attn.q.{leaf}"] = value[:c]
                out[prefix + f"attn.kv.{leaf}"] = value[c:]
                continue
            ffn = {
                "ffn.layers.0.": "mlp.fc1.",
                "ffn.layers.1.": "mlp.dwconv.dwconv.",
                "ffn.layers.4.": "mlp.fc2.",
            }
            for old, new in {"attn.attn.out_proj.": "attn.proj.", **ffn}.items():
                if rest.startswith(old):
                    if old in ("ffn.layers.0.", "ffn.layers.4.") and value.ndim == 4:
                        value = value.reshape(value.shape[:2])
                    rest = new + rest[len(old) :]
                    break
            out[prefix + rest] = value
    return mit_to_canonical(out)


# HF transformers 5 renames the legacy names in memory (`conversion_mapping.py`); undo it.
_HF5_TO_LEGACY = [
    (r"segformer\.stages\.(\d+)\.patch_embeddings\.", r"segformer.encoder.patch_embeddings.\1."),
    (r"segformer\.stages\.(\d+)\.blocks\.", r"segformer.encoder.block.\1."),
    (r"segformer\.stages\.(\d+)\.layer_norm\.", r"segformer.encoder.layer_norm.\1."),
    (r"attention\.sequence_reduction\.sequence_reduction\.", "attention.self.sr."),
    (r"attention\.sequence_reduction\.layer_norm\.", "attention.self.layer_norm."),
    (r"attention\.q_proj\.", "attention.self.query."),
    (r"attention\.k_proj\.", "attention.self.key."),
    (r"attention\.v_proj\.", "attention.self.value."),
    (r"attention\.o_proj\.", "attention.output.dense."),
    (r"mlp\.fc1\.", "mlp.dense1."),
    (r"mlp\.fc2\.", "mlp.dense2."),
    (r"layernorm_before\.", "layer_norm_1."),
    (r"layernorm_after\.", "layer_norm_2."),
    (r"decode_head\.linear_projections\.", "decode_head.linear_c."),
]

_HF_BLOCK = {  # legacy HF block sub-key -> NVlabs block sub-key
    "layer_norm_1.": "norm1.",
    "layer_norm_2.": "norm2.",
    "attention.self.query.": "attn.q.",
    "attention.self.sr.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.",
    "attention.output.dense.": "attn.proj.",
    "mlp.dense1.": "mlp.fc1.",
    "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv.",
    "mlp.dense2.": "mlp.fc2.",
}
_HF_HEAD = {  # legacy HF decode_head sub-key -> mmseg SegFormerHead sub-key
    "linear_fuse.weight": "linear_fuse.conv.weight",
    "batch_norm.": "linear_fuse.bn.",
    "classifier.": "linear_pred.",
}


def hf_to_canonical(state: Mapping) -> State:
    """HF SegFormer (legacy or transformers-5 names, with or without `segformer.`) -> canonical.

    The ImageNet classifier of `SegformerForImageClassification` (`classifier.*`) is dropped.
    """
    legacy: State = {}
    for key, value in state.items():
        if key.startswith("encoder."):  # SegformerModel.save_pretrained has no `segformer.` prefix
            key = "segformer." + key
        for pattern, repl in _HF5_TO_LEGACY:
            key = re.sub(pattern, repl, key)
        legacy[key] = value
    out: State = {}
    kv: dict[str, dict[str, np.ndarray]] = {}
    for key, value in legacy.items():
        if key.startswith("classifier."):
            continue
        m = re.match(r"^segformer\.encoder\.(patch_embeddings|layer_norm|block)\.(\d+)\.(.*)$", key)
        if m:
            kind, stage, rest = m.group(1), int(m.group(2)) + 1, m.group(3)
            if kind == "patch_embeddings":
                out[f"backbone.patch_embed{stage}.{rest.replace('layer_norm.', 'norm.')}"] = value
            elif kind == "layer_norm":
                out[f"backbone.norm{stage}.{rest}"] = value
            else:
                j, sub = rest.split(".", 1)
                prefix = f"backbone.block{stage}.{j}."
                km = re.match(r"^attention\.self\.(key|value)\.(weight|bias)$", sub)
                if km:
                    kv.setdefault(prefix + "attn.kv." + km.group(2), {})[km.group(1)] = value
                    continue
                for old, new in _HF_BLOCK.items():
                    if sub.startswith(old):
                        sub = new + sub[len(old) :]
                        break
                else:
                    raise ConversionError(f"{key!r} is not a HF SegFormer encoder key")
                out[prefix + sub] = value
            continue
        if key.startswith("decode_head."):
            sub = key[len("decode_head.") :]
            for old, new in _HF_HEAD.items():
                if sub.startswith(old):
                    sub = new + sub[len(old) :]
                    break
            out["decode_head." + sub] = value
            continue
        out[key] = value  # reported as unexpected by check_against
    for key, parts in kv.items():
        if set(parts) != {"key", "value"}:
            raise ConversionError(f"{key}: HF checkpoint has only the {sorted(parts)} half of k/v")
        out[key] = np.concatenate([parts["key"], parts["value"]], axis=0)
    return out


def hf_from_canonical(state: Mapping) -> State:
    """Canonical (MiT + SegFormer head) -> legacy HF names, as `save_pretrained` writes them."""
    out: State = {}
    inverse_block = {v: k for k, v in _HF_BLOCK.items()}
    inverse_head = {v: k for k, v in _HF_HEAD.items()}
    for key, value in state.items():
        if key.startswith("backbone."):
            sub = key[len("backbone.") :]
            m = re.match(r"^(patch_embed|norm|block)(\d)\.(.*)$", sub)
            if not m:
                raise ConversionError(f"no HF name for {key!r}")
            kind, stage, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
            if kind == "patch_embed":
                out[
                    f"segformer.encoder.patch_embeddings.{stage}.{rest.replace('norm.', 'layer_norm.')}"
                ] = value
            elif kind == "norm":
                out[f"segformer.encoder.layer_norm.{stage}.{rest}"] = value
            else:
                j, rest = rest.split(".", 1)
                prefix = f"segformer.encoder.block.{stage}.{j}."
                if rest.startswith("attn.kv."):
                    c = value.shape[0] // 2
                    leaf = rest[len("attn.kv.") :]
                    out[prefix + f"attention.self.key.{leaf}"] = value[:c]
                    out[prefix + f"attention.self.value.{leaf}"] = value[c:]
                    continue
                for old, new in inverse_block.items():
                    if rest.startswith(old):
                        rest = new + rest[len(old) :]
                        break
                out[prefix + rest] = value
        elif key.startswith("decode_head."):
            sub = key[len("decode_head.") :]
            if not re.match(r"^(linear_c\.|linear_fuse\.|linear_pred\.)", sub):
                raise ConversionError(
                    f"{key!r}: HF SegFormer has no DAFormer head; export it with --format daformer"
                )
            for old, new in inverse_head.items():
                if sub.startswith(old):
                    sub = new + sub[len(old) :]
                    break
            out["decode_head." + sub] = value
    return out


DAFORMER_MODELS = ("model", "ema_model", "imnet_model")


def daformer_to_canonical(state: Mapping, which: str = "model", family: str = "DAFormer") -> State:
    """DAFormer-family state dict -> canonical, choosing one of the student (`model.`, what the
    original evaluation uses), the EMA teacher (`ema_model.`) or the ImageNet copy (`imnet_model.`).
    A state dict with bare `backbone.*` / `decode_head.*` keys (an mmseg EncoderDecoder) is taken as is.
    `family` names the checkpoint in errors.
    """
    if which not in DAFORMER_MODELS:
        raise ConversionError(f"--which={which!r}: expected one of {DAFORMER_MODELS}")
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    prefixes = sorted({k.split(".", 1)[0] for k in state if k.split(".", 1)[0] in DAFORMER_MODELS})
    if not prefixes:
        return dict(state)
    if which not in prefixes:
        raise ConversionError(
            f"this {family} checkpoint holds {prefixes}, not {which!r}: choose --which from those"
        )
    return _strip(state, which + ".")


def daformer_from_canonical(state: Mapping) -> State:
    return _prefixed(state, "model.")


def has_sepico_head(state: Mapping) -> bool:
    """Whether a state dict (SePiCo's without its `model.` prefix, or canonical) holds an
    `auxiliary_head.*` key: for a SePiCo checkpoint, its projection head."""
    return any(k.startswith(AUXILIARY + ".") for k in state)


def sepico_to_canonical(state: Mapping, which: str = "model") -> State:
    """SePiCo checkpoint -> canonical: `daformer_to_canonical` (SePiCo's training checkpoints
    hold the student as `model.` and the EMA teacher as `ema_model.`; there is no ImageNet copy),
    then its `auxiliary_head.<module path>` is the head `SEPICO_HEAD`."""
    out: State = {}
    head = auxiliary_prefix(SEPICO_HEAD)
    for key, value in daformer_to_canonical(state, which, "SePiCo").items():
        if key.startswith(AUXILIARY + "."):
            key = head + key[len(AUXILIARY) + 1 :]
        out[key] = value
    return out


def sepico_from_canonical(state: Mapping) -> State:
    """Canonical -> SePiCo's layout under `model.`: the head `SEPICO_HEAD` as `auxiliary_head.*`.
    Any other auxiliary head has no place there (SePiCo's segmentor holds one) and is an error."""
    others = sorted({auxiliary_head_name(k) for k in state} - {None, SEPICO_HEAD})
    if others:
        raise ConversionError(
            f"--format sepico holds one auxiliary head, the projection head {SEPICO_HEAD!r}; "
            f"these variables also have {others}: use --format daformer, which keeps each "
            "head under its name, or leave the heads out (--auxiliary_heads=drop)"
        )
    head = auxiliary_prefix(SEPICO_HEAD)
    out: State = {}
    for key, value in state.items():
        if key.startswith(head):
            key = f"{AUXILIARY}.{key[len(head) :]}"
        out[f"model.{key}"] = value
    return out


FORMATS: dict[str, tuple[Callable[..., State], Callable[[Mapping], State]]] = {
    "mit": (mit_to_canonical, mit_from_canonical),
    "mmseg": (mmseg_to_canonical, mmseg_from_canonical),
    "hf": (hf_to_canonical, hf_from_canonical),
    "daformer": (daformer_to_canonical, daformer_from_canonical),
    "sepico": (sepico_to_canonical, sepico_from_canonical),
}
# The formats whose readers take `which` (the sub-model of a UDA checkpoint).
WHICH_FORMATS = ("daformer", "sepico")
