"""LoRA's kernels: the dropout path against autograd, the keep mask, DoRA's magnitudes and norm, in-place inference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_peft.callbacks import LoRA
from lightning_peft.methods.base import count_parameters
from lightning_peft.methods.lora import lora_layer, lora_layers
from lightning_peft.methods.lora_kernels import DroppedLowRank, LoRAWeights, keep_mask

from conftest import random_batch, tiny_gpt2, tiny_llama


# --------------------------------------------------------------------------- dropout
def test_zero_dropout_adds_no_dropout_op_to_the_graph():
    layer = lora_layer(nn.Linear(16, 8), r=2, alpha=4).train()
    out = layer(torch.randn(4, 16, requires_grad=True))
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    names = {type(fn).__name__ for fn in seen}
    assert not any("Dropout" in n or "Mul" in n for n in names), names
    assert "AddmmBackward0" in names


def test_dropout_path_matches_autograd_reference():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = lora_layer(base, r=3, alpha=6, dropout=0.3).train()
    nn.init.normal_(layer.lora["default"].lora_b)
    x = torch.randn(2, 5, 16, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    out.square().sum().backward()
    ours = (
        out.detach(),
        x.grad.clone(),
        layer.lora["default"].lora_a.grad.clone(),
        layer.lora["default"].lora_b.grad.clone(),
    )

    x.grad = None
    a = layer.lora["default"].lora_a.detach().clone().requires_grad_()
    b = layer.lora["default"].lora_b.detach().clone().requires_grad_()
    torch.manual_seed(7)
    mask = keep_mask(x, 0.7)  # the same draws as inside the layer
    assert 0 < int(mask.sum()) < mask.numel()
    dropped = x * mask / 0.7
    ref = base(x) + 2.0 * (dropped @ a.T @ b.T)
    ref.square().sum().backward()
    for got, want in zip(ours, (ref.detach(), x.grad, a.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same math, other rounding order


@pytest.mark.parametrize("keep", [0.95, 0.7, 0.5, 0.1])
def test_keep_mask_is_bernoulli(keep):
    torch.manual_seed(0)
    like = torch.empty(1001, 999)  # odd size: not a multiple of the 4 draws per word
    mask = keep_mask(like, keep)
    assert mask.shape == like.shape and mask.dtype == torch.bool
    n = mask.numel()
    assert abs(mask.float().mean().item() - keep) < 5 * math.sqrt(keep * (1 - keep) / n)
    # neighbours (which share a 64-bit draw) are independent: P(both kept) = keep**2
    both = (mask[:, :-1] & mask[:, 1:]).float().mean().item()
    assert abs(both - keep**2) < 5 * math.sqrt(keep**2 * (1 - keep**2) / n)
    # rows differ and a new call gives a new mask
    assert not torch.equal(mask, keep_mask(like, keep))


def test_dropout_is_off_in_eval_and_under_autocast_gradients_flow():
    layer = lora_layer(nn.Linear(16, 8), r=2, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora["default"].lora_b)
    x = torch.randn(4, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert (
        layer.lora["default"].lora_a.grad is not None
        and layer.lora["default"].lora_a.grad.dtype == torch.float32
    )
    assert layer.lora["default"].lora_b.grad.abs().sum() > 0


def test_dropped_low_rank_handles_no_input_grad():
    x = torch.randn(3, 6)
    result = torch.zeros(3, 4)
    a = torch.randn(2, 6, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)
    DroppedLowRank.apply(x, result, a, b, 0.2, 1.5).sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape


# --------------------------------------------------------------------------- DoRA
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_dora_starts_at_the_base_output_and_counts_magnitudes(factory):
    model = factory()
    batch = random_batch()
    ref = model(**batch).logits
    lora = LoRA(r=4, target_modules="all-linear").apply(factory())
    LoRA(r=4, target_modules="all-linear", use_dora=True).apply(model)
    torch.testing.assert_close(model(**batch).logits, ref, atol=1e-5, rtol=0)
    rows = sum(layer.out_features for _, layer in lora_layers(model))
    assert count_parameters(model)[0] == count_parameters(lora)[0] + rows
    for _, layer in lora_layers(model):
        torch.testing.assert_close(
            layer.lora["default"].magnitude,
            layer.base_layer.weight.norm(dim=-1 if isinstance(layer.base_layer, nn.Linear) else 0),
        )


def test_dora_weight_norm_is_detached():
    layer = lora_layer(nn.Linear(12, 6), r=2, alpha=2, use_dora=True)
    nn.init.normal_(layer.lora["default"].lora_b)
    x = torch.randn(5, 12)
    layer(x).sum().backward()
    got = layer.lora["default"].lora_b.grad.clone()
    # Reference: the same formula with the norm as a constant.
    a = layer.lora["default"].lora_a.detach().requires_grad_()
    b = layer.lora["default"].lora_b.detach().requires_grad_()
    w = layer.base_layer.weight
    norm = (w + b.detach() @ a.detach()).norm(dim=1)
    out = (layer.lora["default"].magnitude.detach() / norm) * (x @ (w + b @ a).T) + layer.base_layer.bias
    out.sum().backward()
    torch.testing.assert_close(got, b.grad)


@pytest.mark.parametrize("dora", [False, True])
def test_inference_adds_into_the_base_output_only_when_nothing_else_reads_it(dora):
    """Without gradients the update goes into the base layer's fresh output; the result must
    equal the gradient path's, and a hook on the base layer (or DoRA) must still see W x + b."""
    torch.manual_seed(0)
    layer = lora_layer(nn.Linear(16, 8), r=2, alpha=4)
    layer.add(LoRAWeights("dora", 16, 8, 2, 1.0, 0.0, True, layer.base_layer))
    if not dora:
        del layer.lora["dora"]
    for weights in layer.lora.values():
        nn.init.normal_(weights.lora_b)
    x = torch.randn(3, 5, 16)
    with_grad = layer(x)
    with torch.no_grad():
        without = layer(x)
        base = layer.base_layer(x)
    torch.testing.assert_close(without, with_grad, rtol=0, atol=1e-6)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        hooked = layer(x)
    handle.remove()
    torch.testing.assert_close(hooked, with_grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[0], base, rtol=0, atol=0)  # the hook's tensor was not added into
