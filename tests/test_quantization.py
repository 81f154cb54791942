"""The 4-bit functional core: layers, dequantization, bit counting, streaming loads."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft.quantization import (
    QuantSpec,
    bits_per_parameter,
    dense_weight,
    dequantize_model,
    is_4bit,
    load_quantized,
    plain_layer,
    quantizable_modules,
    quantization_report,
    quantize_linear,
    quantize_model,
    quantize_on_init,
    requantization_error,
    state_dict_bits,
)

from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), 0))


def ids(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- dense_weight
def test_dense_weight_of_plain_layers_is_out_by_in():
    lin = nn.Linear(8, 5)
    assert dense_weight(lin).shape == (5, 8)
    assert torch.equal(dense_weight(lin), lin.weight)
    conv = Conv1D(5, 8)  # GPT-2 layer: stores (in, out)
    nn.init.normal_(conv.weight)
    assert conv.weight.shape == (8, 5)
    assert torch.equal(dense_weight(conv), conv.weight.T)
    assert dense_weight(lin, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="Embedding"):
        dense_weight(nn.Embedding(4, 4))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("source", ["linear", "conv1d"])
def test_quantized_layer_dequantizes_close_to_original(quant_type, source):
    torch.manual_seed(0)
    layer = nn.Linear(128, 96) if source == "linear" else Conv1D(96, 128)
    nn.init.normal_(layer.weight, std=0.02)
    q = quantize_linear(layer, quant_type=quant_type)
    assert is_4bit(q) and q.source_type == ("Linear" if source == "linear" else "Conv1D")
    assert q.weight.dtype == torch.uint8 and not q.weight.requires_grad
    original = dense_weight(layer)
    restored = dense_weight(q)
    assert restored.shape == (96, 128)
    # 4-bit codes: error per weight at most about half a code step of its block's scale
    assert (restored - original).abs().max() < 0.25 * original.abs().max()
    assert cosine(restored, original) > 0.99
    # what bitsandbytes itself reads back
    assert torch.equal(restored, bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state))
    # plain_layer gives the original kind of layer back
    back = plain_layer(q)
    assert isinstance(back, Conv1D if source == "conv1d" else nn.Linear)
    assert torch.equal(dense_weight(back), restored)


def test_quantizing_the_same_weights_twice_is_bit_identical():
    torch.manual_seed(0)
    lin = nn.Linear(256, 192)
    a, b = quantize_linear(lin), quantize_linear(lin)
    assert torch.equal(a.weight.data, b.weight.data)
    sa, sb = a.weight.quant_state, b.weight.quant_state
    assert torch.equal(sa.absmax, sb.absmax)
    assert torch.equal(sa.state2.absmax, sb.state2.absmax) and torch.equal(sa.offset, sb.offset)
    da, db = a.state_dict(), b.state_dict()
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)


def test_eval_no_grad_forward_does_not_repack_our_layer():
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(128, 64))
    q.support_avx512bf16_for_cpu = True  # the switch bitsandbytes' own forward reads to repack
    before_data, before = q.weight.data.clone(), dense_weight(q)
    q.eval()
    with torch.no_grad():
        q(torch.randn(3, 128))
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(q.weight.data, before_data)
    assert torch.equal(dense_weight(q), before)


def _bnb_layer(out_f: int = 64, in_f: int = 128) -> bnb.nn.Linear4bit:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    layer = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")


def test_dense_weight_after_bitsandbytes_cpu_repack():
    """bitsandbytes' own layer repacks in eval/no_grad forward on AVX512-BF16 CPUs; forced here."""
    layer = _bnb_layer()
    before = dense_weight(layer)
    layer.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on such CPUs
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    state = layer.weight.quant_state
    assert getattr(state, "packing_format_for_cpu", False) and layer.weight.shape == (64, 64)
    # bitsandbytes' dequantize now reads the new layout wrongly ...
    wrong = bnbF.dequantize_4bit(layer.weight.data, state)
    assert not torch.allclose(wrong.float(), before, atol=1e-2)
    # ... dense_weight reads it right: the repack rounds the scales to bf16, nothing else
    after = dense_weight(layer)
    assert after.shape == before.shape and after.dtype == before.dtype
    assert torch.allclose(after, before, rtol=1e-2, atol=1e-6)


def test_our_forward_undoes_a_foreign_repack():
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(128, 64), compute_dtype=torch.float32)
    x = torch.randn(2, 128)
    expected = q(x)
    q.weight.data, q.weight.quant_state = bnbF._convert_weight_packed_for_cpu(
        q.weight.data, q.weight.quant_state
    )
    assert torch.allclose(dense_weight(q) @ x.T, expected.T - q.bias[:, None], rtol=1e-2, atol=1e-3)
    out = q(x)
    assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    assert q.weight.shape == (128 * 64 // 2, 1)
    assert cosine(out, expected) > 0.999


# --------------------------------------------------------------------------- the layer
def test_forward_and_input_gradient_match_the_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = quantize_linear(lin, compute_dtype=torch.float32)
    w = dense_weight(q)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x)
    assert y.shape == (3, 5, 32) and y.dtype == torch.float32
    assert torch.allclose(y, x @ w.T + lin.bias, atol=1e-5)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w.T + lin.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)


def test_bf16_compute_keeps_input_dtype_and_a_trainable_fp32_bias():
    q = quantize_linear(nn.Linear(64, 32))
    q.bias.requires_grad_(True)
    y = q(torch.randn(2, 64))
    assert y.dtype == torch.float32
    y.sum().backward()
    assert q.bias.dtype == torch.float32 and q.bias.grad is not None and q.bias.grad.dtype == torch.float32


@pytest.mark.parametrize("width", [32, 64])
def test_narrow_layers_quantize_and_backpropagate(width):
    q = quantize_linear(nn.Linear(width, width))
    x = torch.randn(4, width, requires_grad=True)
    q(x).sum().backward()
    assert x.grad.shape == (4, width) and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quant_type": "nf5"}, "quant_type"),
        ({"quant_type": "int4"}, "quant_type"),
        ({"compute_dtype": torch.int8}, "compute_dtype"),
        ({"compute_dtype": "float64"}, "compute_dtype"),
        ({"compute_dtype": "banana"}, "compute_dtype"),
        ({"blocksize": 48}, "blocksize"),
        ({"blocksize": 32}, "blocksize"),
        ({"double_quant": "yes"}, "double_quant"),
        ({"quant_storage": torch.int64}, "quant_storage"),
    ],
)
def test_invalid_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_dtype_names_are_accepted():
    assert QuantSpec(compute_dtype="bf16").compute_dtype is torch.bfloat16
    assert QuantSpec(compute_dtype="torch.float16").compute_dtype is torch.float16


# --------------------------------------------------------------------------- whole models
def test_quantize_model_skips_head_trainable_tied_and_named_layers(llama):
    llama.requires_grad_(False)
    llama.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    names = quantize_model(llama, skip_modules=["down_proj", "model.layers.0.self_attn"])
    assert "lm_head" not in names and isinstance(llama.lm_head, nn.Linear) and not is_4bit(llama.lm_head)
    assert not any(n.endswith("down_proj") or ".layers.0.self_attn." in n for n in names)
    assert "model.layers.1.mlp.up_proj" not in names
    assert "model.layers.1.self_attn.q_proj" in names
    assert all(is_4bit(llama.get_submodule(n)) for n in names)
    assert quantizable_modules(llama, ["down_proj", "model.layers.0.self_attn"]) == []


def test_four_bit_logits_stay_close_to_full_precision():
    model = tiny_llama(hidden=256).requires_grad_(False)
    x = ids()
    reference = model(input_ids=x).logits
    quantize_model(model)
    assert cosine(model(input_ids=x).logits, reference) > 0.9


def test_bits_per_parameter_nf4_double_quant():
    model = tiny_llama(hidden=256).requires_grad_(False)
    n_layers = len(quantize_model(model))
    report = quantization_report(model)
    assert report["quantized_layers"] == n_layers == 14
    assert 4.12 < bits_per_parameter(model) <= 4.13
    # the saved state dict: 4-bit data + fixed tables + metadata + the rest, within 3%
    budget = 4.13 * report["quantized_weights"] + report["other_bits"]
    assert state_dict_bits(model) <= 1.03 * budget
    assert state_dict_bits(model) >= report["total_bits"]


def test_bits_per_parameter_fp4_without_double_quant():
    model = tiny_llama(hidden=256).requires_grad_(False)
    quantize_model(model, QuantSpec(quant_type="fp4", double_quant=False))
    assert 4.4 < bits_per_parameter(model) <= 4.5
    with pytest.raises(ValueError, match="no 4-bit layer"):
        bits_per_parameter(tiny_llama())


def test_dequantize_model_restores_plain_layers(gpt2):
    gpt2.requires_grad_(False)
    x = ids()
    quantize_model(gpt2)
    quantized_logits = gpt2(input_ids=x).logits
    names = dequantize_model(gpt2, torch.float32)
    assert names and isinstance(gpt2.get_submodule(names[0]), Conv1D)
    assert not any(is_4bit(m) for m in gpt2.modules())
    assert cosine(gpt2(input_ids=x).logits, quantized_logits) > 0.99


# --------------------------------------------------------------------------- building and loading
def test_quantize_on_init_builds_layer_by_layer_and_spares_method_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_peft.callbacks import Adapter

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with quantize_on_init(skip_modules=["down_proj"]):
        model = LlamaForCausalLM(cfg)
        Adapter(bottleneck=8).apply(model)  # its layers train: never quantized
    assert is_4bit(model.model.layers[0].self_attn.q_proj)
    assert not is_4bit(model.lm_head) and not is_4bit(model.model.layers[0].mlp.down_proj)
    trained = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    assert trained and not any(is_4bit(m) for m in trained)
    assert torch.isfinite(model(input_ids=ids()).logits).all()
    with pytest.raises(ValueError, match="nested modules"):
        with quantize_on_init(skip_modules=["layers.0.mlp"]):
            pass


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_load_quantized_matches_quantizing_the_loaded_model(tmp_path, factory):
    model = factory(hidden=256)
    model.save_pretrained(tmp_path)
    streamed = load_quantized(tmp_path, dtype=torch.float32)
    model.requires_grad_(False)
    names = quantize_model(model)
    assert {n for n, m in streamed.named_modules() if is_4bit(m)} == set(names)
    for name in names:
        a, b = streamed.get_submodule(name), model.get_submodule(name)
        assert torch.equal(a.weight.data, b.weight.data)  # bit-identical codes
        assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax)
    x = ids()
    assert torch.allclose(streamed(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    assert not any(p.requires_grad for p in streamed.parameters())


def test_load_quantized_adds_prefix_and_initializes_a_new_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    bert = tiny_bert_classifier(hidden=128)
    bert.bert.save_pretrained(tmp_path)  # a bare encoder: keys without "bert.", no classifier
    model = load_quantized(tmp_path, AutoModelForSequenceClassification, num_labels=3)
    assert model.classifier.out_features == 3 and model.classifier.weight.device.type == "cpu"
    assert not is_4bit(model.classifier)
    assert torch.equal(
        model.bert.embeddings.word_embeddings.weight, bert.bert.embeddings.word_embeddings.weight.bfloat16()
    )
    assert is_4bit(model.bert.encoder.layer[0].attention.self.query)
    assert model(input_ids=ids()).logits.shape == (2, 3)


def test_load_quantized_needs_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_load_quantized_auto_dtype_keeps_the_checkpoints(tmp_path, stored):
    tiny_llama().to(stored).save_pretrained(tmp_path)
    model = load_quantized(tmp_path, dtype="auto")
    assert model.model.embed_tokens.weight.dtype == stored and model.lm_head.weight.dtype == stored
    assert load_quantized(tmp_path, dtype="float16").lm_head.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="floating"):
        load_quantized(tmp_path, dtype="int8")


# --------------------------------------------------------------------------- merge cost
def test_requantization_error_reports_both_costs():
    from lightning_peft.callbacks import LoRA

    model = tiny_llama(hidden=128)
    LoRA(r=4).apply(model)
    quantize_model(model)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_b" in name:
            nn.init.normal_(p, std=0.05)
    report = requantization_error(model, {"input_ids": ids()})
    assert report["layers"] == 14
    assert report["cosine_merged"] > 0.999  # folding in full precision reproduces the model
    assert report["max_abs_requantized"] > report["max_abs_merged"]
    with pytest.raises(ValueError, match="nothing would be re-quantized"):
        requantization_error(tiny_llama().requires_grad_(False), {"input_ids": ids()})


HEAP_SCRIPT = """
import sys, torch
from lightning_peft.quantization import return_large_blocks_to_os


def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


if sys.argv[1] == "1":
    assert return_large_blocks_to_os()
big = torch.ones(8 * 2**20 // 4)
del big  # glibc raises its mmap threshold after this free
before = rss()
blocks = [torch.ones(2**20 // 4) for _ in range(200)]  # 200 x 1 MiB
pin = torch.ones(2**20 // 4)  # allocated last: the heap cannot shrink below it
del blocks
print(round(rss() - before))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt on Linux")
def test_return_large_blocks_to_os_gives_freed_tensors_back(tmp_path):
    """Without it, 200 MiB of freed 1 MiB tensors stay resident behind one live tensor; with it, they leave."""
    script = tmp_path / "heap.py"
    script.write_text(HEAP_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    kept = {}
    for setting in ("0", "1"):
        out = subprocess.run(
            [sys.executable, str(script), setting], capture_output=True, text=True, env=env, timeout=300
        )
        assert out.returncode == 0, out.stderr[-2000:]
        kept[setting] = int(out.stdout.split()[-1])
    assert kept["0"] > 150 and kept["1"] < 20, kept
