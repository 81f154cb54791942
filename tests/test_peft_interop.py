"""Hugging Face PEFT round trips through export_peft / import_peft, checked against the real ``peft``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lightning_peft import CausalLM, export_peft, import_peft
from lightning_peft.methods import applied_methods, declare_trainable, sync_requires_grad
from lightning_peft.methods.adapter import AdapterConfig
from lightning_peft.methods.lora import LoRAConfig
from lightning_peft.methods.partial import PartialFinetuningConfig
from lightning_peft.methods.prefix import PrefixTuningConfig
from lightning_peft.methods.prompt import PromptTuningConfig
from lightning_peft.persistence import delta_state_dict

from conftest import random_batch, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
P = 4  # virtual tokens


def _perturb(model, seed: int = 3) -> None:
    """Move every trained tensor away from its initial value (B is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(delta_state_dict(model, keep_vars=True).items()):
            t.add_(torch.randn(t.shape, generator=g) * 0.05)


def _logits(model, **batch_kw) -> torch.Tensor:
    batch = random_batch(**batch_kw)
    batch["attention_mask"][1, -3:] = 0
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**batch).logits


def _peft_load(make, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(make(), str(folder)).eval()


# --------------------------------------------------------------------------- ours -> PEFT
LORA_CASES = {
    "llama-lora": (tiny_llama, dict(r=4, alpha=8)),
    "llama-dora": (tiny_llama, dict(r=4, alpha=8, use_dora=True)),
    "llama-rslora": (tiny_llama, dict(r=4, alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "gpt2-conv1d-lora": (tiny_gpt2, dict(r=4, alpha=16)),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_exported_lora_loads_in_peft_with_equal_logits(tmp_path, case):
    make, kwargs = LORA_CASES[case]
    model = LoRAConfig(**kwargs).apply(make())
    _perturb(model)
    export_peft(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = list(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and all(k.startswith("base_model.model.") for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == kwargs.get("use_dora", False)
    theirs = _peft_load(make, tmp_path)
    torch.testing.assert_close(_logits(theirs), _logits(model), rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(make()), _logits(model), atol=1e-3)  # the adapter matters


def test_export_from_a_lightning_module_names_tensors_for_the_hf_model(tmp_path):
    module = CausalLM(tiny_llama())
    LoRAConfig(r=4).apply(module)
    _perturb(module)
    export_peft(module, tmp_path)
    assert not any("backbone" in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    torch.testing.assert_close(_logits(_peft_load(tiny_llama, tmp_path)), _logits(module), rtol=0, atol=1e-5)


def test_exported_prompt_and_prefix_load_in_peft(tmp_path):
    prompt = PromptTuningConfig(num_virtual_tokens=P).apply(tiny_llama())
    _perturb(prompt)
    export_peft(prompt, tmp_path / "prompt")
    assert list(load_file(str(tmp_path / "prompt" / "adapter_model.safetensors"))) == ["prompt_embeddings"]
    theirs = _peft_load(tiny_llama, tmp_path / "prompt")
    torch.testing.assert_close(_logits(theirs)[:, P:], _logits(prompt), rtol=0, atol=1e-5)

    prefix = PrefixTuningConfig(num_virtual_tokens=P).apply(tiny_llama())
    _perturb(prefix)
    export_peft(prefix, tmp_path / "prefix")
    theirs = _peft_load(tiny_llama, tmp_path / "prefix")
    torch.testing.assert_close(_logits(theirs), _logits(prefix), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- PEFT -> ours
PEFT_CASES = {
    "llama-lora": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-dora": (
        tiny_llama,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
    ),
    "llama-rslora": (tiny_llama, dict(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True)),
    "gpt2-conv1d": (
        tiny_gpt2,
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_saved_lora_imports_with_equal_logits_and_keeps_training(tmp_path, case):
    make, kwargs = PEFT_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)  # B = 0 at init: make it count
    theirs.save_pretrained(str(tmp_path))
    ours = import_peft(make(), tmp_path)
    assert [m.name for m in applied_methods(ours)] == ["lora"]
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-5)
    # training continues from the imported weights
    ours.train()
    ours(**random_batch(labels="lm")).loss.backward()
    grads = [p.grad for _, p in delta_state_dict(ours, keep_vars=True).items()]
    assert grads and all(g is not None for g in grads)


def test_peft_saved_prompt_and_prefix_import(tmp_path):
    for kind, cfg in (
        ("prompt", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
        ("prefix", peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(tiny_llama(), cfg)
        theirs.save_pretrained(str(tmp_path / kind))
        ours = import_peft(tiny_llama(), tmp_path / kind)
        expected = _logits(theirs)
        if kind == "prompt":
            expected = expected[:, P:]  # PEFT returns the virtual positions too
        torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=1e-5, msg=kind)


# --------------------------------------------------------------------------- refusals
def test_export_refuses_what_peft_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="no method is applied"):
        export_peft(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="PEFT has no equivalent.*save_delta"):
        export_peft(AdapterConfig(bottleneck=4).apply(tiny_llama()), tmp_path)
    with pytest.raises(ValueError, match="PEFT has no equivalent.*save_delta"):
        export_peft(PartialFinetuningConfig(parts=["layernorm"]).apply(tiny_llama()), tmp_path)
    combined = PartialFinetuningConfig(parts=["layernorm"]).apply(tiny_llama())
    LoRAConfig(r=2).apply(combined)
    with pytest.raises(ValueError, match="combines"):
        export_peft(combined, tmp_path)
    extra = LoRAConfig(r=2).apply(tiny_llama())
    declare_trainable(extra.model.norm)  # trained outside the method: PEFT's LoRA would drop it
    sync_requires_grad(extra)
    with pytest.raises(ValueError, match="lose"):
        export_peft(extra, tmp_path)
    assert not list(tmp_path.iterdir())


def test_import_refuses_pickles_and_unknown_types(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle"):
        import_peft(tiny_llama(), tmp_path)
    (tmp_path / "adapter_model.bin").unlink()
    LoRAConfig(r=2).apply(model := tiny_llama())
    export_peft(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "VERA", "target_modules": ["k_proj"]})
    )
    target = tiny_llama()
    with pytest.raises(ValueError, match="peft_type 'VERA' has no counterpart here"):
        import_peft(target, tmp_path)
    assert applied_methods(target) == []
