"""merge / unmerge / export_merged: idempotent, all-or-nothing, and loadable by bare transformers."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lightning_peft import CausalLM, SequenceClassifier, export_merged, merge, unmerge
from lightning_peft.callbacks import LoRA
from lightning_peft.merging import merged_state_dict
from lightning_peft.methods.lora import lora_layers

from conftest import random_batch, tiny_bert_classifier, tiny_gpt2, tiny_llama


def _adapted(factory=tiny_llama, seed: int = 0, **kwargs) -> nn.Module:
    model = LoRA(r=4, alpha=8, **kwargs).apply(factory())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora["default"].lora_b.copy_(
                torch.randn(layer.lora["default"].lora_b.shape, generator=g) * 0.05
            )
            if layer.lora["default"].magnitude is not None:
                layer.lora["default"].magnitude.mul_(
                    1 + 0.1 * torch.randn(layer.lora["default"].magnitude.shape, generator=g)
                )
    return model


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model)}


def _logits(model: nn.Module, batch=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(batch or random_batch())).logits


def test_merge_is_idempotent_and_skips_the_adapter_path():
    model = _adapted()
    ref = _logits(model)
    merge(model)
    once = _base_weights(model)
    merge(model)
    assert all(torch.equal(once[n], w) for n, w in _base_weights(model).items())
    torch.testing.assert_close(_logits(model), ref, atol=1e-4, rtol=0)
    # while merged the adapter path does not run: changing B changes nothing
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora["default"].lora_b.add_(1.0)
    torch.testing.assert_close(_logits(model), ref, atol=1e-4, rtol=0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora["default"].lora_b.sub_(1.0)
    unmerge(model)
    unmerge(model)  # idempotent too
    assert not any(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(_logits(model), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_changes_weights_and_unmerge_restores_them(use_dora):
    model = _adapted(tiny_gpt2, use_dora=use_dora)
    original = _base_weights(model)
    ref = _logits(model)
    merge(model)
    assert any(not torch.equal(original[n], w) for n, w in _base_weights(model).items())
    torch.testing.assert_close(_logits(model), ref, atol=1e-4, rtol=0)
    unmerge(model)
    for name, weight in _base_weights(model).items():
        torch.testing.assert_close(weight, original[name], atol=1e-5, rtol=0)


def test_refused_merge_leaves_every_layer_untouched():
    model = _adapted()
    layers = lora_layers(model)
    with torch.no_grad():
        layers[-1][1].lora["default"].lora_b[0, 0] = float("nan")  # only the last layer is bad
    before = _base_weights(model)
    with pytest.raises(ValueError, match="not finite"):
        merge(model)
    assert all(torch.equal(before[n], w) for n, w in _base_weights(model).items())
    assert not any(layer.merged for _, layer in layers)

    with torch.no_grad():
        layers[-1][1].lora["default"].lora_b[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        merge(model)
    assert all(torch.equal(before[n], w) for n, w in _base_weights(model).items())


def test_merge_on_a_lightning_module_and_without_a_method():
    module = CausalLM(tiny_llama())
    LoRA(r=2, target_modules=["q_proj"]).apply(module)
    merge(module)
    assert all(layer.merged for _, layer in lora_layers(module))
    unmerge(module)
    assert not any(layer.merged for _, layer in lora_layers(module))
    with pytest.raises(ValueError, match="no fine-tuning method"):
        merge(tiny_llama())


def _saved_keys(folder) -> set[str]:
    keys: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys |= set(f.keys())
    return keys


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [
        (tiny_llama, {}),
        (tiny_llama, {"use_dora": True, "use_rslora": True}),
        (tiny_gpt2, {}),
        (tiny_gpt2, {"use_dora": True}),
    ],
)
def test_export_merged_loads_in_bare_transformers(tmp_path, factory, kwargs):
    from transformers import AutoModelForCausalLM

    model = _adapted(factory, **kwargs)
    ref = _logits(model)
    tensors_before = {k: v.clone() for k, v in model.state_dict().items()}
    export_merged(model, tmp_path / "merged")
    keys = _saved_keys(tmp_path / "merged")
    assert keys and not any("lora" in k or "magnitude" in k or ".base." in k for k in keys)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(plain) is type(factory())
    torch.testing.assert_close(_logits(plain), ref, atol=1e-4, rtol=0)
    # the live model was not touched
    assert not any(layer.merged for _, layer in lora_layers(model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tensors_before.items())


def test_export_merged_classifier_with_trained_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    module = SequenceClassifier(tiny_bert_classifier(), num_labels=2)
    LoRA(r=4, target_modules=["query", "value"]).apply(module)
    with torch.no_grad():
        for _, layer in lora_layers(module):
            layer.lora["default"].lora_b.normal_(std=0.05)
        module.backbone.classifier.weight.normal_()
    ref = _logits(module.eval())
    export_merged(module, tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(plain), ref, atol=1e-4, rtol=0)


def test_export_merged_of_a_merged_model_and_in_bfloat16(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _adapted()
    ref = _logits(model)
    merge(model)
    export_merged(model, tmp_path / "a")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    torch.testing.assert_close(_logits(plain), ref, atol=1e-4, rtol=0)
    unmerge(model)
    export_merged(model, tmp_path / "b", dtype=torch.bfloat16)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert half.dtype == torch.bfloat16
    assert _logits(half).dtype == torch.bfloat16


def test_merged_state_dict_matches_a_plain_model_and_refuses_unmergeable(tmp_path):
    model = _adapted()
    plain_keys = set(tiny_llama().state_dict())
    assert set(merged_state_dict(model)) == plain_keys
    with pytest.raises(ValueError, match="PreTrainedModel"):
        export_merged(LoRA(r=2).apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))), tmp_path / "x")
    # a module the merge cannot fold (not a LoRA layer) leaves foreign tensors: refused
    stray = _adapted()
    stray.model.layers[0].extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no place for"):
        export_merged(stray, tmp_path / "y")
