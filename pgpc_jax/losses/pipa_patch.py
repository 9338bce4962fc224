"""PiPa's patch-wise contrast: the directional, confidence-gated loss over two overlapping crops.

Source [released]: PiPa (Chen et al., ACM MM 2023), `chen742/PiPa`,
`PiPa_DAFormer/mmseg/models/uda/dacs.py: DACS.forward_train`, the block from `# Patch Contrast`
to `loss_unsup` (CAC's directional context-aware contrast, Lai et al. CVPR 2021, pasted into
DACS; constants in `DACS.__init__`: `temp` 0.1, `pos_thresh_value` 0.9, `selected_num` 1600,
`step_save` 2, `weight_unsup` 0.1; active from `local_iter` 10000). The crop pair and the
overlap indexing are `pgpc_jax.uda.overlap_crops`.

The released loss for view 1, over the paired overlap positions k of the whole batch (view 2
symmetric, with 1 and 2 swapped), all vectors L2-normalised by the caller:

  pos_k  = o1_k . sg(o2_k) / tau
  neg_kb = o1_k . b / tau                    for the bank rows b (detached)
  m_k    = max(pos_k, max_b neg_kb)          over every bank row, whatever its label
  down_k = exp(pos_k - m_k) + sum_{b: y_b != y1_k} exp(neg_kb - m_k)
  l_k    = -log( exp(pos_k - m_k) / (down_k + 1e-8) + 1e-8 )
  gate_k = conf2_k > 0.9  and  conf1_k < conf2_k
  L1     = sum_k gate_k l_k / (sum_k gate_k + 1e-12)

and the method adds `0.1 * (L1 + L2)` to the mix loss. Negatives of the anchor's own pseudo
label are excluded [released]; the positive is always in the denominator; both 1e-8 and the
1e-12 are released constants (the second makes the loss 0 when no position passes the gate).
The gate pulls the less confident view towards the more confident one: in L1 the gradient
reaches view 1 only (view 2 is the detached target), in L2 view 2 only.

The bank [released]: each patch step samples 1600 positions, without replacement, from each
view's whole-batch feature map (flattened B * h * w, crops as the network saw them), keeps their
features and pseudo labels detached, and appends them to the bank BEFORE the loss is computed;
the bank holds the last 3 steps (the current one included): 9600 rows once full, 3200 and 6400
at the first two patch steps. `bank_rows` samples one step's rows; keeping them is
`uda.ring_buffer` (same set of rows, another slot order, which this loss does not depend on).

The pseudo labels and confidences [released]: argmax and max softmax of a 1x1 conv
`classifier` (256 -> 19) on the same pooled features, detached (`pseudo_labels`).

Released quirk (gradient): the features are the EMA teacher's (`get_ema_model().encode_decode`
-> fused decoder feature, avg-pooled by 2, then the trainable `project` MLP 256 -> 256 -> 128),
and the teacher's parameters are detached (`_init_ema_weights`), so no gradient reaches the
segmentor: as released the loss trains only `project`, which nothing else uses, and
`classifier` is never trained (its pseudo labels and confidences come from its random
initialisation). The functions here take the features as inputs, so the caller chooses: teacher
features (as released, no effect on the segmentor) or student features (as the paper
describes, and as CAC runs it).

[reconstructed] The shift m_k. The release computes the negatives in chunks of 8000 bank rows
and takes m_k over pos_k and the FIRST chunk only (later chunks reuse it); with a 9600-row bank
the last 1600 rows are outside the max. Here m_k runs over pos_k and every valid bank row: equal
to the release when the bank has at most 8000 rows, and otherwise different only through the
two 1e-8 terms (m_k cancels from the ratio). The gradient flows through m_k as through the
released `torch.max`.

[fixed shape] The overlap positions come as arrays of any leading shape (e.g. [B, oh, ow] from
`overlap_crops.overlap_feature_indices`) with a `valid` mask; the bank as [L, D] with labels and
a `bank_valid` mask (e.g. a ring buffer's filled slots). Invalid positions and rows change
nothing; the mean is over the valid gated positions of the whole batch, as the release
concatenates the images' overlaps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _float_dtype(x: jax.Array) -> jnp.dtype:
    # At least float32 (bf16 features are promoted); float64 stays float64 (gradient checks).
    return jnp.promote_types(x.dtype, jnp.float32)


def pseudo_labels(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pseudo label and confidence per position, detached (the release's argmax / max softmax).

    Args:
      logits: [..., C] classifier outputs.

    Returns:
      (labels int32 [...], confidences [...] in (0, 1], at least float32).
    """
    logits = jnp.asarray(logits)
    logits = jax.lax.stop_gradient(logits.astype(_float_dtype(logits)))
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)


def bank_rows(
    key: jax.Array,
    feats1: jax.Array,
    feats2: jax.Array,
    labels1: jax.Array,
    labels2: jax.Array,
    num_per_view: int = 1600,
) -> tuple[jax.Array, jax.Array]:
    """One step's bank rows: positions drawn without replacement from each view's feature map.

    As the release: view 1's rows then view 2's, each from the whole batch flattened (B * h * w,
    crops as the network saw them), one independent draw per view; detached.

    Args:
      key: PRNG key.
      feats1, feats2: [B, h, w, D] the two views' projected features.
      labels1, labels2: int [B, h, w] their pseudo labels.
      num_per_view: positions per view (1600), at most B * h * w.

    Returns:
      (rows [2 * num_per_view, D], labels int32 [2 * num_per_view]), to push to the bank before
      the loss is computed.
    """
    feats1, feats2 = jnp.asarray(feats1), jnp.asarray(feats2)
    dim = feats1.shape[-1]
    count = feats1.shape[0] * feats1.shape[1] * feats1.shape[2]
    if not 0 < num_per_view <= count:
        raise ValueError(f"bank_rows: num_per_view={num_per_view} must lie in 1..{count}")
    out_feats, out_labels = [], []
    for k, f, y in zip(jax.random.split(key), (feats1, feats2), (labels1, labels2)):
        pick = jax.random.choice(k, count, (num_per_view,), replace=False)
        out_feats.append(f.reshape(count, dim)[pick])
        out_labels.append(jnp.asarray(y, jnp.int32).reshape(count)[pick])
    rows = jax.lax.stop_gradient(jnp.concatenate(out_feats))
    return rows, jnp.concatenate(out_labels)


def patch_contrast_one_side(
    anchor: jax.Array,
    target: jax.Array,
    anchor_labels: jax.Array,
    anchor_conf: jax.Array,
    target_conf: jax.Array,
    valid: jax.Array,
    bank_feats: jax.Array,
    bank_labels: jax.Array,
    bank_valid: jax.Array,
    *,
    temperature: float = 0.1,
    confidence_threshold: float = 0.9,
    eps: float = 1e-8,
) -> jax.Array:
    """The released loss of one view (L1 with anchor = view 1, target = view 2).

    Args:
      anchor: [..., D] the anchor view's overlap features (the gradient flows into these).
      target: [..., D] the other view's features at the same scene points (detached here).
      anchor_labels: int [...] the anchor view's pseudo labels (which bank rows are negatives).
      anchor_conf, target_conf: [...] the two views' confidences (max softmax).
      valid: bool [...] the positions that belong to the overlap.
      bank_feats: [L, D] bank rows (detached here).
      bank_labels: int [L] their pseudo labels.
      bank_valid: bool [L] the filled rows.
      temperature: tau (0.1).
      confidence_threshold: the target's confidence gate (0.9).
      eps: the release's 1e-8 in the ratio and in the log.

    Returns:
      Scalar: the mean of l_k over the valid positions that pass the gate; 0 when none does.
    """
    anchor, target, bank_feats = (jnp.asarray(x) for x in (anchor, target, bank_feats))
    dim = anchor.shape[-1]
    dtype = _float_dtype(anchor)
    valid = jnp.asarray(valid, bool).reshape(-1)
    bank_valid = jnp.asarray(bank_valid, bool)
    # Padding (invalid positions and rows) is zeroed first, so that whatever it holds (NaN
    # included) reaches neither the value nor the gradient.
    a = jnp.where(valid[:, None], anchor.reshape(-1, dim).astype(dtype), 0.0)  # [N, D]
    t = jnp.where(valid[:, None], target.reshape(-1, dim).astype(dtype), 0.0)
    t = jax.lax.stop_gradient(t)
    bank = jnp.where(bank_valid[:, None], bank_feats.astype(dtype), 0.0)  # [L, D]
    bank = jax.lax.stop_gradient(bank)
    labels = jnp.asarray(anchor_labels, jnp.int32).reshape(-1)

    pos = jnp.sum(a * t, axis=-1) / temperature  # [N]
    neg = a @ bank.T / temperature  # [N, L]
    neg_max = jnp.max(jnp.where(bank_valid[None], neg, -jnp.inf), axis=-1)
    shift = jnp.maximum(pos, neg_max)  # [N], all bank rows, own label included (released)
    negative = bank_valid[None] & (jnp.asarray(bank_labels, jnp.int32)[None] != labels[:, None])
    neg_terms = jnp.exp(jnp.where(negative, neg - shift[:, None], -jnp.inf))  # [N, L]
    down = jnp.exp(pos - shift) + jnp.sum(neg_terms, axis=-1)
    ratio = jnp.exp(pos - shift) / (down + eps)
    per_pos = -jnp.log(ratio + eps)  # [N]

    a_conf = jnp.asarray(anchor_conf).reshape(-1).astype(dtype)
    t_conf = jnp.asarray(target_conf).reshape(-1).astype(dtype)
    gate = (t_conf > confidence_threshold) & (a_conf < t_conf) & valid
    total = jnp.sum(jnp.where(gate, per_pos, 0.0))
    return total / (jnp.sum(gate.astype(dtype)) + 1e-12)


def directional_patch_loss(
    feats1: jax.Array,
    feats2: jax.Array,
    labels1: jax.Array,
    labels2: jax.Array,
    conf1: jax.Array,
    conf2: jax.Array,
    valid: jax.Array,
    bank_feats: jax.Array,
    bank_labels: jax.Array,
    bank_valid: jax.Array,
    *,
    temperature: float = 0.1,
    confidence_threshold: float = 0.9,
    eps: float = 1e-8,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1 + L2 of the release (module docstring); the method weighs it (0.1).

    Pass student features for the loss as the paper describes, teacher features for the loss as
    released (then no gradient reaches the segmentor; module docstring).

    Args:
      feats1, feats2: [..., D] paired overlap features of view 1 / view 2 (e.g. [B, oh, ow, D]
        from `overlap_crops.gather_overlap`), L2-normalised.
      labels1, labels2: int [...] pseudo labels at the same positions.
      conf1, conf2: [...] confidences at the same positions.
      valid: bool [...] overlap positions.
      bank_feats, bank_labels, bank_valid: the bank, [L, D], int [L], bool [L].
      temperature, confidence_threshold, eps: as `patch_contrast_one_side`.

    Returns:
      (L1 + L2, {'view1': L1, 'view2': L2}), scalars.
    """
    kwargs = dict(temperature=temperature, confidence_threshold=confidence_threshold, eps=eps)
    bank = (bank_feats, bank_labels, bank_valid)
    loss1 = patch_contrast_one_side(feats1, feats2, labels1, conf1, conf2, valid, *bank, **kwargs)
    loss2 = patch_contrast_one_side(feats2, feats1, labels2, conf2, conf1, valid, *bank, **kwargs)
    return loss1 + loss2, {"view1": loss1, "view2": loss2}
