"""Learning-rate schedule and AdamW parameter groups against mmcv 1.3.x and torch.optim.AdamW."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

from configs import tiny
from pgpc_jax import optim
from pgpc_jax.models.segmentor import abstract_variables, build_segmentor
from pgpc_jax.torch_names import canonical_layout, variables_to_canonical


def _mmcv_lr(it, base_lr, max_iters, warmup_iters, warmup_ratio, power=1.0, min_lr=0.0):
    # PolyLrUpdaterHook.get_lr, then LrUpdaterHook.before_train_iter / get_warmup_lr('linear').
    regular = (base_lr - min_lr) * (1 - it / max_iters) ** power + min_lr
    if it >= warmup_iters:
        return regular
    k = (1 - it / warmup_iters) * (1 - warmup_ratio)
    return regular * (1 - k)


@pytest.mark.parametrize("step", [0, 1, 2, 1499, 1500, 1501, 20000, 39998, 39999])
def test_learning_rate_matches_mmcv_daformer_schedule(step):
    expected = _mmcv_lr(step, 6e-5, 40000, 1500, 1e-6)
    assert float(optim.learning_rate(step)) == pytest.approx(expected, rel=3e-7)
    assert float(jax.jit(optim.learning_rate)(step)) == pytest.approx(expected, rel=3e-7)


@pytest.mark.parametrize("step", [0, 3, 9, 10, 55, 99])
def test_learning_rate_with_min_lr_and_power(step):
    kw = dict(base_lr=1e-2, num_steps=100, warmup_steps=10, warmup_ratio=0.1, power=0.9)
    got = optim.learning_rate(step, min_lr=1e-4, **kw)
    expected = _mmcv_lr(step, 1e-2, 100, 10, 0.1, power=0.9, min_lr=1e-4)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_match_custom_key_is_mmcvs_first_match_longest_first():
    keys = optim.custom_keys()
    assert optim.match_custom_key("decode_head.conv_seg.weight", keys) == "head"
    assert optim.match_custom_key("backbone.block1.0.attn.norm.weight", keys) == "norm"
    assert optim.match_custom_key("backbone.block1.0.attn.q.bias", keys) == "default"
    # Ties of length are broken alphabetically ('head' before 'norm'); longer keys come first.
    assert optim.match_custom_key("decode_head.norm.weight", keys) == "head"
    assert optim.match_custom_key("backbone.pos_block.norm.weight", keys) == "pos_block"


@pytest.fixture(scope="module")
def tiny_params():
    model = build_segmentor(tiny.get_config().model)
    shapes = abstract_variables(model)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


_GROUPS = ["default", "head", "norm", "pos_block"]


def test_param_groups_of_the_tiny_segmentor(tiny_params):
    labels = optim.param_group_labels(tiny_params, optim.custom_keys())
    # Through the torch names: encode each label as a one-element array for the name mapping.
    coded = jax.tree.map(lambda g: np.array([_GROUPS.index(g)]), labels)
    groups = {
        name: _GROUPS[int(v.flat[0])]
        for name, v in variables_to_canonical({"params": coded}).items()
    }
    for name, group in groups.items():
        if name.startswith("decode_head."):
            assert group == "head", name  # the head's BN included
        elif "norm" in name:
            assert group == "norm", name
        else:
            assert group == "default", name  # encoder biases decay too
    assert groups["backbone.patch_embed1.norm.bias"] == "norm"
    assert groups["backbone.norm4.weight"] == "norm"
    assert groups["backbone.block3.1.attn.sr.bias"] == "default"
    assert groups["decode_head.fuse_layer.bottleneck.bn.weight"] == "head"
    assert set(groups.values()) == {"head", "norm", "default"}


class _ToyProjection(nn.Module):
    """A method's auxiliary head at test size: 1x1 conv + BN (+ a norm named 'norm') on stage 4."""

    @nn.compact
    def __call__(self, features, train):
        x = nn.Conv(8, (1, 1))(features[-1])
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.LayerNorm(name="norm")(x)


def test_auxiliary_head_parameters_take_the_head_rule(tiny_params):
    model = build_segmentor(tiny.get_config().model, {"proj": _ToyProjection()})
    params = abstract_variables(model)["params"]
    labels = optim.param_group_labels(params, optim.custom_keys())
    aux = traverse_util.flatten_dict(labels["auxiliary_head"])
    # Conv kernel and bias, BN scale and bias, LayerNorm scale and bias (named 'norm').
    assert len(aux) == 6 and set(aux.values()) == {"head"}, aux
    # mmseg's matcher on the torch names, as DAFormer's custom keys give them.
    names = canonical_layout({"params": {"auxiliary_head": params["auxiliary_head"]}})
    assert "auxiliary_head.proj.norm.weight" in names
    for name in names:
        assert optim.match_custom_key(name, optim.custom_keys()) == "head", name
    # The segmentor's own groups do not change beside an auxiliary head.
    without = dict(labels)
    del without["auxiliary_head"]
    assert without == optim.param_group_labels(tiny_params, optim.custom_keys())


def _torch_param_groups(canonical, base_lr, base_wd):
    # mmcv DefaultOptimizerConstructor.add_params with DAFormer's custom_keys, on torch names.
    custom = {
        "head": dict(lr_mult=10.0),
        "pos_block": dict(decay_mult=0.0),
        "norm": dict(decay_mult=0.0),
    }
    order = sorted(sorted(custom), key=len, reverse=True)
    tensors, groups = {}, []
    for name, value in canonical.items():
        tensors[name] = torch.nn.Parameter(torch.tensor(value))
        group = {"params": [tensors[name]]}
        for key in order:
            if key in name:
                group["lr"] = base_lr * custom[key].get("lr_mult", 1.0)
                group["weight_decay"] = base_wd * custom[key].get("decay_mult", 1.0)
                break
        groups.append(group)
    return tensors, groups


def test_one_adamw_run_matches_torch_with_mmcv_groups(tiny_params):
    # Large rate and decay so that a wrong group (lr or decay) shows far above float noise.
    hp = dict(learning_rate=1e-2, weight_decay=0.1, warmup_steps=2, warmup_ratio=0.1)
    num_steps = 10
    tx = optim.make_optimizer(tiny_params, num_steps, **hp).tx
    params = jax.tree.map(jnp.asarray, tiny_params)
    state = jax.jit(tx.init)(params)
    canonical = variables_to_canonical({"params": tiny_params})
    tensors, groups = _torch_param_groups(canonical, hp["learning_rate"], hp["weight_decay"])
    opt = torch.optim.AdamW(groups, lr=hp["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=hp["weight_decay"])  # fmt: skip
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(1)
    for it in range(3):  # warm-up steps 0, 1 and the first regular step 2
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), tiny_params)
        params, state = step(params, state, grads)
        for group in opt.param_groups:  # mmcv sets each group's lr before the iteration
            group["lr"] = _mmcv_lr(it, group["initial_lr"], num_steps, 2, 0.1)
        torch_grads = variables_to_canonical({"params": grads})
        for name, t in tensors.items():
            t.grad = torch.tensor(torch_grads[name])
        opt.step()
        ours = variables_to_canonical({"params": params})
        before = canonical
        if it == 0:
            _check_first_step_rates(ours, before, variables_to_canonical({"params": grads}), hp)
        for name, t in tensors.items():
            ref = t.detach().numpy()
            # Compare the parameter changes, each to its own scale.
            np.testing.assert_allclose(ours[name] - before[name], ref - before[name],
                                       rtol=1e-4, atol=1e-6, err_msg=f"{name} iter {it}")  # fmt: skip
        canonical = {name: t.detach().numpy().copy() for name, t in tensors.items()}
        params = jax.tree.map(jnp.asarray, _canonical_like(canonical, params))


def _canonical_like(canonical, params):
    # Re-sync ours to torch's values (so float drift cannot accumulate across iterations).
    from pgpc_jax.torch_names import canonical_to_variables

    return canonical_to_variables(canonical, {"params": params})["params"]


def _check_first_step_rates(after, before, grads, hp):
    # From zero moments the first AdamW change is -lr * (g / (|g| + eps) + wd * p): read each
    # parameter's lr and decay back, by the rules written out (not through mmcv's matcher).
    warm = hp["warmup_ratio"]  # step 0 of the warm-up: lr = base * ratio
    for name, p in before.items():
        if name.startswith("decode_head."):
            lr, wd = 10 * hp["learning_rate"] * warm, hp["weight_decay"]
        elif "norm" in name:
            lr, wd = hp["learning_rate"] * warm, 0.0
        else:
            lr, wd = hp["learning_rate"] * warm, hp["weight_decay"]
        g = grads[name]
        expected = -lr * (g / (np.abs(g) + 1e-8) + wd * p)
        np.testing.assert_allclose(after[name] - p, expected, rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_head_started_late_matches_torch_adamw_skipping_it_until_then():
    # SePiCo's projection head has no gradient before start_distribution_iter: torch's AdamW
    # skips it (no decay, no Adam state), then starts its bias correction at that step, at the
    # global step's rate. Ours gets zero gradients before the start (the head's loss is
    # multiplied by 0) and `start_steps` must reproduce torch exactly.
    model = build_segmentor(tiny.get_config().model, {"proj": _ToyProjection()})
    shapes = abstract_variables(model)["params"]
    rng = np.random.default_rng(3)
    init = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    hp = dict(learning_rate=1e-2, weight_decay=0.1, warmup_steps=2, warmup_ratio=0.1)
    num_steps, start = 10, 3
    tx = optim.make_optimizer(init, num_steps, **hp, start_steps={"auxiliary_head/proj": start}).tx
    plain = optim.make_optimizer(init, num_steps, **hp).tx
    canonical = variables_to_canonical({"params": init})
    tensors, groups = _torch_param_groups(canonical, hp["learning_rate"], hp["weight_decay"])
    opt = torch.optim.AdamW(groups, lr=hp["learning_rate"], eps=1e-8,
                            weight_decay=hp["weight_decay"])  # fmt: skip
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]

    def stepper(tx):
        @jax.jit
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step

    step, plain_step = stepper(tx), stepper(plain)
    params = jax.tree.map(jnp.asarray, init)
    state, plain_state, plain_params = tx.init(params), plain.init(params), params
    for it in range(start + 2):
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), init)
        if it < start:
            grads["auxiliary_head"] = jax.tree.map(np.zeros_like, grads["auxiliary_head"])
        before = variables_to_canonical({"params": params})
        params, state = step(params, state, grads)
        plain_params, plain_state = plain_step(plain_params, plain_state, grads)
        for group in opt.param_groups:
            group["lr"] = _mmcv_lr(it, group["initial_lr"], num_steps, 2, 0.1)
        torch_grads = variables_to_canonical({"params": grads})
        for name, t in tensors.items():
            head = name.startswith("auxiliary_head.")
            t.grad = None if head and it < start else torch.tensor(torch_grads[name])
        opt.step()
        ours = variables_to_canonical({"params": params})
        for name, t in tensors.items():
            ref = t.detach().numpy()
            np.testing.assert_allclose(ours[name] - before[name], ref - before[name],
                                       rtol=1e-4, atol=1e-6, err_msg=f"{name} iter {it}")  # fmt: skip
            if name.startswith("auxiliary_head.") and it < start:
                np.testing.assert_array_equal(ours[name], before[name])
        if it == 0:
            plain_head = variables_to_canonical({"params": plain_params})
            decayed = any(
                not np.array_equal(plain_head[name], before[name])
                for name in tensors
                if name.startswith("auxiliary_head.")
            )
        # The other parameters are exactly those of the optimizer without the delay.
        for part in ("backbone", "decode_head"):
            for a, b in zip(jax.tree.leaves(params[part]), jax.tree.leaves(plain_params[part])):
                np.testing.assert_array_equal(a, b)
        canonical = {name: t.detach().numpy().copy() for name, t in tensors.items()}
        params = jax.tree.map(jnp.asarray, _canonical_like(canonical, params))
        plain_params = params
    assert decayed  # without the delay the head moves before the start: what the option fixes


def test_a_start_step_for_parameters_that_do_not_exist_is_refused(tiny_params):
    with pytest.raises(ValueError, match="auxiliary_head/projection"):
        optim.make_optimizer(tiny_params, 10, start_steps={"auxiliary_head/projection": 5})
