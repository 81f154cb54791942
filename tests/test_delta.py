"""Delta folders and fingerprints: trainable state, atomic saves, validation before any change."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_peft
from lightning_peft import CausalLM, load_delta, save_delta
from lightning_peft.methods import REGISTRY, Method, applied_methods, declare_trainable, register
from lightning_peft.methods.lora import LoRAConfig
from lightning_peft.methods.partial import PartialFinetuningConfig
from lightning_peft.persistence import CorruptDeltaError, DeltaError, delta_state_dict, read_delta
from lightning_peft.persistence.fingerprint import (
    IGNORE_FINGERPRINT_ENV,
    FingerprintMismatchError,
    _sample,
    fingerprint,
    fingerprint_mismatches,
)

from conftest import random_batch, tiny_bert_classifier, tiny_gpt2, tiny_llama

TESTS = Path(__file__).parent


# --------------------------------------------------------------------------- a small test-only method
class _Shift(nn.Module):
    """Trainable shift plus a persistent step counter; declared trainable as a whole."""

    def __init__(self, width: int, adapter: str) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        declare_trainable(self, adapter=adapter)


class _Shifted(nn.Module):
    def __init__(self, inner: nn.Module, width: int, adapter: str) -> None:
        super().__init__()
        self.inner = inner
        self.delta = _Shift(width, adapter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., width)
        return self.inner(x) + self.delta.shift


@dataclass
class _ShiftConfig(Method):
    """Test-only method: a trainable shift after the final norm of a Llama."""

    width: int = 64

    name = "test_shift"
    callback_name = "TestShift"

    def inject(self, model: nn.Module) -> None:
        owner = next(m for m in model.modules() if hasattr(m, "norm") and hasattr(m, "layers"))
        owner.norm = _Shifted(owner.norm, self.width, self.adapter_name)


@pytest.fixture
def shift_method():
    register(_ShiftConfig)
    yield _ShiftConfig
    REGISTRY.pop(_ShiftConfig.name, None)


def _logits(model: nn.Module, seed: int = 1) -> torch.Tensor:
    batch = random_batch(seed=seed)
    with torch.no_grad():
        out = model(**batch)
    return out.logits


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Give every trainable tensor non-trivial values (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(delta_state_dict(model, keep_vars=True).items()):
            if t.dtype.is_floating_point:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.add_(7)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# --------------------------------------------------------------------------- trainable state
def test_trainable_state_holds_declared_params_and_owned_persistent_buffers(shift_method):
    model = shift_method().apply(tiny_llama())
    state = delta_state_dict(model)
    assert list(state) == ["model.norm.delta.shift", "model.norm.delta.updates"]
    assert not any(t.requires_grad for t in state.values())  # detached copies of references
    held = delta_state_dict(model, keep_vars=True)
    assert held["model.norm.delta.shift"] is model.model.norm.delta.shift


def test_trainable_state_of_lora_is_exactly_the_adapter():
    model = LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]).apply(tiny_llama())
    names = list(delta_state_dict(model))
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(n.endswith((".lora_a", ".lora_b")) for n in names)


# --------------------------------------------------------------------------- fingerprint
def test_trainable_state_names_skip_checkpoint_wrapper_levels():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from lightning_peft.callbacks import LoRA

    plain = LoRA(r=2, target_modules=["q_proj"]).apply(tiny_llama())
    wrapped = LoRA(r=2, target_modules=["q_proj"]).apply(tiny_llama())
    layers = wrapped.model.layers
    for i, block in enumerate(layers):  # what activation checkpointing / FSDP1 auto-wrapping do
        layers[i] = checkpoint_wrapper(block)
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    names = list(delta_state_dict(wrapped))
    assert names == list(delta_state_dict(plain))
    assert set(names) <= set(wrapped.state_dict())  # the names state_dict() uses


def test_fingerprint_is_stable_and_tells_bases_of_one_shape_apart():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    fa, fb = fingerprint(a), fingerprint(b)
    assert fa == fb and fa["count"] == len(list(a.parameters())) == 21
    assert all(len(e["sha"]) == 32 for e in fa["tensors"])
    other = fingerprint(tiny_llama(seed=1))
    assert other["digest"] != fa["digest"]
    problems = fingerprint_mismatches(fa, other)
    assert len(problems) == fa["count"] - 5  # all but the 5 norm weights (all ones in both)
    assert "model.layers.0.self_attn.q_proj.weight: values differ" in problems
    json.dumps(fa)  # JSON-safe


def test_fingerprint_covers_only_frozen_tensors_and_matches_by_position():
    model = LoRAConfig(r=4).apply(tiny_llama())
    fp = fingerprint(model)
    names = [e["name"] for e in fp["tensors"]]
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert not any("lora" in n for n in names)
    wrapped = CausalLM(LoRAConfig(r=4).apply(tiny_llama()))
    assert fingerprint_mismatches(fp, fingerprint(wrapped)) == []  # other prefix, same base
    # Before the method is applied the base has the same tensors under other names.
    assert fingerprint_mismatches(fp, fingerprint(tiny_llama()), subsequence=True) == []
    assert fingerprint_mismatches(fp, fingerprint(tiny_llama(seed=2)), subsequence=True)


def test_fingerprint_samples_without_materializing():
    huge = torch.ones(1).expand(10**6, 10**6)  # a 10^12-element view of one float
    values = _sample(huge)
    assert values.shape == (64,) and bool((values == 1).all())
    strided = torch.arange(24.0).reshape(4, 6).T  # non-contiguous
    assert _sample(strided, 3).tolist() == [0.0, 20.0, 23.0]  # flat positions 0, 11, 23 of the (6, 4) view
    with torch.device("meta"):
        meta = tiny_llama(hidden=256, num_layers=4)
    fp = fingerprint(meta)
    assert all(e["sha"] is None for e in fp["tensors"])
    assert fingerprint_mismatches(fp, fingerprint(tiny_llama(hidden=256, num_layers=4))) == []


def test_fingerprint_of_4bit_base_is_stable_and_matches_its_original():
    from lightning_peft.core.targeting import replace_module
    from lightning_peft.quantization import quantize_linear

    def quantized(seed: int) -> nn.Module:
        model = LoRAConfig(r=4).apply(tiny_gpt2(seed=seed))
        for name, module in list(model.named_modules()):
            if name.endswith(".base_layer"):
                replace_module(model, name, quantize_linear(module, compute_dtype=torch.float32))
        return model

    full = fingerprint(LoRAConfig(r=4).apply(tiny_gpt2()))
    q = quantized(0)
    fq = fingerprint(q)
    assert sum(bool(e.get("quantized")) for e in fq["tensors"]) == 8  # 4 Conv1D layers x 2 blocks
    assert fq["digest"] != full["digest"]
    assert fingerprint_mismatches(full, fq) == []  # 4-bit vs full precision: approximate match
    assert fingerprint_mismatches(fq, fingerprint(quantized(0))) == []
    with torch.no_grad():
        q(**random_batch())  # bitsandbytes may repack on an eval forward; the fingerprint must not move
    assert fingerprint(q) == fq
    other = fingerprint(quantized(1))
    assert any(
        "c_attn.base_layer.weight: values differ" in p for p in fingerprint_mismatches(full, other)
    )  # another base is told apart across precisions too


# --------------------------------------------------------------------------- save / load
def test_save_and_load_into_a_fresh_base_restores_outputs(tmp_path):
    model = LoRAConfig(r=4, use_dora=True).apply(tiny_llama())
    _perturb(model)
    expected = _logits(model)
    save_delta(model, tmp_path / "d")
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert files[0].startswith("delta-") and files[1:] == ["manifest.json"] and len(files) == 2
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["adapters"] == [m.to_dict() for m in applied_methods(model)]
    assert set(manifest["versions"]) == {"lightning_peft", "torch", "transformers"}
    assert set(manifest["tensors"]) == set(delta_state_dict(model))
    assert manifest["fingerprint"] == fingerprint(model)
    fresh = tiny_llama()
    assert load_delta(fresh, tmp_path / "d") is fresh
    assert [m.to_dict() for m in applied_methods(fresh)] == manifest["adapters"]
    torch.testing.assert_close(_logits(fresh), expected, rtol=0, atol=0)
    # Loading again into the model that now carries the method is fine too.
    load_delta(fresh, tmp_path / "d")


def test_a_new_save_replaces_the_generation(tmp_path, shift_method):
    model = shift_method().apply(tiny_llama())
    save_delta(model, tmp_path)
    _perturb(model)
    save_delta(model, tmp_path)
    assert len(list(tmp_path.glob("delta-*.safetensors"))) == 1
    assert all(p.suffix in (".json", ".safetensors") for p in tmp_path.iterdir())
    fresh = load_delta(tiny_llama(), tmp_path)
    assert int(fresh.model.norm.delta.updates) == 7  # buffer of a wholly trainable module travels too
    assert torch.equal(fresh.model.norm.delta.shift, model.model.norm.delta.shift)


def test_names_saved_under_a_lightning_module_load_into_the_bare_model(tmp_path):
    module = CausalLM(tiny_llama())
    LoRAConfig(r=4).apply(module)
    _perturb(module)
    save_delta(module, tmp_path)
    assert all(k.startswith("backbone.") for k in read_delta(tmp_path)[1])
    bare = load_delta(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(bare), _logits(module.backbone), rtol=0, atol=0)


def test_partial_and_combined_methods_round_trip(tmp_path):
    bert = PartialFinetuningConfig(parts=["bias"]).apply(tiny_bert_classifier())
    LoRAConfig(r=2, target_modules=["query", "value"]).apply(bert)
    _perturb(bert)
    save_delta(bert, tmp_path)
    fresh = load_delta(tiny_bert_classifier(), tmp_path)
    assert [m.name for m in applied_methods(fresh)] == ["partial", "lora"]
    torch.testing.assert_close(_logits(fresh), _logits(bert), rtol=0, atol=0)


def test_another_base_is_refused_by_name_and_left_untouched(tmp_path, monkeypatch):
    model = LoRAConfig(r=4).apply(tiny_llama())
    _perturb(model)
    save_delta(model, tmp_path)
    other = tiny_llama(seed=1)
    before = _snapshot(other)
    with pytest.raises(FingerprintMismatchError, match="q_proj.base_layer.weight: values differ") as err:
        load_delta(other, tmp_path)
    assert "strict_fingerprint=False" in str(err.value) and IGNORE_FINGERPRINT_ENV in str(err.value)
    assert applied_methods(other) == []
    _assert_unchanged(other, before)
    with pytest.warns(UserWarning, match="base model differs"):
        load_delta(other, tmp_path, strict_fingerprint=False)
    assert torch.equal(
        other.model.layers[1].mlp.up_proj.lora["default"].lora_b,
        model.model.layers[1].mlp.up_proj.lora["default"].lora_b,
    )
    monkeypatch.setenv(IGNORE_FINGERPRINT_ENV, "1")
    with pytest.warns(UserWarning, match="base model differs"):
        load_delta(tiny_llama(seed=2), tmp_path)


def test_other_methods_on_the_target_are_refused(tmp_path):
    save_delta(LoRAConfig(r=4).apply(tiny_llama()), tmp_path)
    target = LoRAConfig(r=2).apply(tiny_llama())
    before = _snapshot(target)
    with pytest.raises(DeltaError, match="already carries"):
        load_delta(target, tmp_path)
    _assert_unchanged(target, before)


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest-sha", "missing-file"])
def test_damaged_folder_raises_and_leaves_the_model_as_it_was(tmp_path, damage):
    model = LoRAConfig(r=4).apply(tiny_llama())
    _perturb(model)
    save_delta(model, tmp_path)
    data = next(tmp_path.glob("delta-*.safetensors"))
    raw = bytearray(data.read_bytes())
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        raw[-5] ^= 0x10  # one bit of one tensor value
        data.write_bytes(bytes(raw))
    elif damage == "manifest-sha":
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        name = next(iter(manifest["tensors"]))
        manifest["tensors"][name]["sha256"] = "0" * 64
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    else:
        data.unlink()
    for target in (tiny_llama(), LoRAConfig(r=4).apply(tiny_llama())):
        methods = [m.to_dict() for m in applied_methods(target)]
        before = _snapshot(target)
        with pytest.raises(CorruptDeltaError):
            load_delta(target, tmp_path)
        _assert_unchanged(target, before)
        assert [m.to_dict() for m in applied_methods(target)] == methods


def test_manifest_cannot_name_paths_or_code(tmp_path):
    save_delta(LoRAConfig(r=4).apply(tiny_llama()), tmp_path)
    original = (tmp_path / "manifest.json").read_text()
    for field, value, error in [
        ("file", "../delta-0123456789abcdef.safetensors", "'file' must name"),
        ("adapters", [{"method": "os.system", "command": "echo hi"}], "unknown method 'os.system'"),
        ("adapters", [{"method": "lora", "r": 4, "__init__": 1}], "no option"),
        ("format_version", 99, "format_version 99 is not supported"),
    ]:
        manifest = json.loads(original)
        manifest[field] = value
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DeltaError, match=error):
            load_delta(tiny_llama(), tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptDeltaError, match="not valid JSON"):
        load_delta(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no delta"):
        load_delta(tiny_llama(), tmp_path / "nothing")


def test_save_refuses_foreign_folders_merged_layers_and_untrained_models(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    model = LoRAConfig(r=4).apply(tiny_llama())
    with pytest.raises(ValueError, match="not part of a delta"):
        save_delta(model, tmp_path)
    model.model.layers[0].self_attn.q_proj.merge_adapter("default")
    with pytest.raises(ValueError, match="unmerge"):
        save_delta(model, tmp_path / "d")
    with pytest.raises(ValueError, match="no declared-trainable"):
        save_delta(tiny_llama(), tmp_path / "e")
    assert lightning_peft.save_delta is save_delta  # the public name


# --------------------------------------------------------------------------- killed savers
_SAVER = textwrap.dedent(
    """
    import os, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama
    from lightning_peft import save_delta
    from lightning_peft.persistence import delta_state_dict
    from lightning_peft.persistence import fingerprint
    from lightning_peft.methods.lora import LoRAConfig

    folder = sys.argv[1]
    model = LoRAConfig(r=4).apply(tiny_llama())
    tensors = list(delta_state_dict(model, keep_vars=True).values())
    print("fingerprint", fingerprint(model)["digest"], flush=True)
    for line in sys.stdin:  # one forked saver per line; the test kills it
        start = int(line)
        pid = os.fork()
        if pid == 0:
            generation = start
            while True:
                with torch.no_grad():
                    for t in tensors:
                        t.fill_(generation)
                save_delta(model, folder)
                generation += 1
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.slow
def test_saver_killed_at_random_moments_always_leaves_a_loadable_generation(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_SAVER.format(tests=str(TESTS)))
    folder = tmp_path / "delta"
    model = LoRAConfig(r=4).apply(tiny_llama())
    with torch.no_grad():
        for t in delta_state_dict(model, keep_vars=True).values():
            t.fill_(0)
    save_delta(model, folder)  # generation 0: the folder always holds a complete delta
    proc = subprocess.Popen(
        [sys.executable, str(script), str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        header = proc.stdout.readline().split()
        assert header[:1] == ["fingerprint"], header
        assert header[1] == fingerprint(model)["digest"]  # the same in another process
        rng = random.Random(0)
        seen, start = [0], 1
        for _ in range(20):
            proc.stdin.write(f"{start}\n")
            proc.stdin.flush()
            pid = int(proc.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
            assert proc.stdout.readline().strip() == "reaped"
            assert all(p.suffix in (".json", ".safetensors") for p in folder.iterdir())
            loaded = load_delta(tiny_llama(), folder)
            values = {float(t.flatten()[0]) for t in delta_state_dict(loaded).values()}
            values |= {float(t.min()) for t in delta_state_dict(loaded).values()}
            values |= {float(t.max()) for t in delta_state_dict(loaded).values()}
            assert len(values) == 1, f"a mix of generations: {values}"
            generation = int(values.pop())
            assert generation >= seen[-1]  # never goes back to an older generation
            seen.append(generation)
            start = max(start, generation + 1) + 1000
        assert len({g for g in seen}) > 10, f"the saver hardly ever completed a save: {seen}"
    finally:
        proc.kill()
        proc.wait()
