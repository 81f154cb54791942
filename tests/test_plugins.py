"""FourBitPrecision in real Lightning runs: what gets quantized, what trains, export, resume, limits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import peft_runs
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import lightning_peft
from lightning_peft import CausalLM
from lightning_peft.callbacks import LoRA
from lightning_peft.methods.base import registry, trainable_named_parameters
from lightning_peft.methods.lora import lora_layers
from lightning_peft.plugins import FourBitPrecision, check_strategy
from lightning_peft.quantization import (
    bits_per_parameter,
    is_4bit,
    quantization_report,
    requantization_error,
    state_dict_bits,
)

from conftest import fit_recipe, random_batch, tiny_gpt2, tiny_llama, tiny_llama_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(steps: int, callbacks: list, plugin: FourBitPrecision | None = None, **kw) -> L.Trainer:
    return peft_runs.trainer(
        steps, callbacks=callbacks, plugins=[plugin] if plugin is not None else None, **kw
    )


def _loader(n: int = 4, seq: int = 16) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        [random_batch(labels="lm", seq=seq, seed=i) for i in range(n)], batch_size=None
    )


def _logits(model: nn.Module, seed: int = 7) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**random_batch(seed=seed)).logits.float()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))


def _lora_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable_named_parameters(module)}


@pytest.fixture(scope="module")
def qlora_run():
    """Six QLoRA steps (NF4 + double quantization, bf16 compute) on a 256-wide tiny Llama."""
    torch.manual_seed(0)
    module = CausalLM(tiny_llama(hidden=256), lr=5e-3)
    before = None

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal before
            before = _lora_snapshot(pl_module)

    plugin = FourBitPrecision()
    trainer = _trainer(6, [LoRA(r=4, alpha=8), Snapshot()], plugin)
    trainer.fit(module, _loader())
    return module, trainer, plugin, before


# --------------------------------------------------------------------------- what a run holds
def test_qlora_fit_holds_four_bit_base_and_fp32_trained_lora(qlora_run):
    module, trainer, plugin, before = qlora_run
    backbone = module.backbone
    wrapped = [m for _, m in lora_layers(backbone)]
    assert len(wrapped) == 14  # every linear of 2 Llama blocks
    assert all(is_4bit(m.base_layer) for m in wrapped)
    assert len(plugin.quantized_modules) == 14 and all(
        n.endswith(".base_layer") for n in plugin.quantized_modules
    )
    # the head stays a full-precision nn.Linear
    assert type(backbone.lm_head) is nn.Linear and backbone.lm_head.weight.dtype == torch.float32
    # at most 4.13 bits per quantized weight, and the state dict is that plus the rest
    report = quantization_report(module)
    assert bits_per_parameter(module) <= 4.13
    assert state_dict_bits(module) <= 1.03 * (4.13 * report["quantized_weights"] + report["other_bits"])
    # LoRA parameters: floating point, fp32, trainable, in the optimizer, and trained
    trained = dict(trainable_named_parameters(module))
    assert trained and all(".lora_" in n for n in trained)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trained.values())
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in trained.values()}
    changed = [n for n, p in trained.items() if not torch.equal(p, before[n])]
    assert len(changed) == len(trained)
    assert not any(p.requires_grad for n, p in module.named_parameters() if n not in trained)


def test_fp4_without_double_quant_holds_at_most_4_5_bits():
    module = CausalLM(tiny_llama(hidden=256), lr=1e-3)
    _trainer(1, [LoRA(r=4)], FourBitPrecision("fp4", double_quant=False)).fit(module, _loader(1))
    assert 4.4 < bits_per_parameter(module) <= 4.5
    layer = next(m for m in module.modules() if is_4bit(m))
    assert layer.weight.quant_type == "fp4" and not layer.weight.compress_statistics


@pytest.mark.parametrize("width", [32, 64])
def test_narrow_models_quantize_and_train(width):
    module = CausalLM(tiny_llama(hidden=width, heads=2, kv_heads=1), lr=1e-2)
    before = _lora_snapshot(LoRA(r=2).apply(module))
    _trainer(2, [LoRA(r=2)], FourBitPrecision()).fit(module, _loader(2))
    assert sum(is_4bit(m) for m in module.modules()) == 14
    after = _lora_snapshot(module)
    assert any(not torch.equal(after[n], before[n]) for n in before)


def test_four_bit_model_logits_stay_close_to_full_precision():
    model = tiny_llama(hidden=256)
    reference = _logits(model)
    module = CausalLM(model)
    LoRA(r=4).apply(module)  # lora_b starts at zero: same function as the base
    FourBitPrecision().convert_module(module)
    assert _cos(_logits(module), reference) > 0.9


# --------------------------------------------------------------------------- any method
@pytest.mark.parametrize(
    "callback",
    [
        pytest.param(lambda: LoRA(r=4, use_dora=True), id="dora"),
        pytest.param(lambda: lightning_peft.callbacks.Adapter(bottleneck=8), id="adapter"),
        pytest.param(lambda: lightning_peft.callbacks.PrefixTuning(num_virtual_tokens=4), id="prefix"),
        pytest.param(lambda: lightning_peft.callbacks.PromptTuning(num_virtual_tokens=4), id="prompt"),
    ],
)
def test_other_methods_train_over_a_four_bit_base(callback):
    module = CausalLM(tiny_llama(), lr=1e-2)
    method = callback()
    method.apply(module)
    before = _lora_snapshot(module)
    _trainer(2, [method], FourBitPrecision()).fit(module, _loader(2))
    trained = dict(trainable_named_parameters(module))
    assert trained.keys() == before.keys()
    assert all(p.dtype == torch.float32 and not is_quantized_param(p) for p in trained.values())
    assert any(not torch.equal(p, before[n]) for n, p in trained.items())
    assert sum(is_4bit(m) for m in module.modules()) >= 7
    ids_trained = {id(p) for p in trained.values()}
    for m in module.modules():  # no module holding a trained parameter was quantized
        if is_4bit(m):
            assert not any(id(p) in ids_trained for p in m.parameters())


def is_quantized_param(p: torch.Tensor) -> bool:
    return getattr(p, "quant_state", None) is not None


def test_trainable_bf16_parameters_are_upcast_to_fp32():
    module = CausalLM(tiny_llama().to(torch.bfloat16))
    LoRA(r=4).apply(module)
    assert {p.dtype for _, p in trainable_named_parameters(module)} == {torch.bfloat16}
    FourBitPrecision().convert_module(module)
    assert {p.dtype for _, p in trainable_named_parameters(module)} == {torch.float32}
    assert module.backbone.model.embed_tokens.weight.dtype == torch.bfloat16  # frozen rest untouched
    with FourBitPrecision().forward_context():
        assert module(**random_batch(labels="lm")).loss.isfinite()


# --------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_over_four_bit_base_reaches_lora():
    module = CausalLM(tiny_llama(hidden=64), gradient_checkpointing=True)
    grads: dict[str, float] = {}

    class Grads(Callback):
        def on_after_backward(self, trainer, pl_module):
            for n, p in trainable_named_parameters(pl_module):
                grads[n] = 0.0 if p.grad is None else float(p.grad.abs().sum())

    LoRA(r=4).apply(module)
    torch.manual_seed(0)
    for name, p in trainable_named_parameters(module):
        if name.endswith("lora_b"):  # non-zero B, so that A receives a gradient in the first step too
            nn.init.normal_(p, std=0.01)
    _trainer(1, [LoRA(r=4), Grads()], FourBitPrecision()).fit(module, _loader(1))
    assert module.backbone.is_gradient_checkpointing
    assert sum(is_4bit(m) for m in module.modules()) == 14
    assert len(grads) == 28 and all(g > 0 for g in grads.values()), grads


# --------------------------------------------------------------------------- building under the plugin
class BuildsInConfigureModel(CausalLM):
    """A module whose backbone is created inside ``configure_model`` (so under the plugin's context)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(1, 1))  # placeholder backbone, replaced in configure_model
        del self.backbone

    def configure_model(self) -> None:
        if hasattr(self, "backbone"):
            return
        from transformers import LlamaForCausalLM

        self.backbone = LlamaForCausalLM(tiny_llama_config())
        seen["quantized_while_building"] = sum(is_4bit(m) for m in self.backbone.modules())
        self.backbone.requires_grad_(False)


seen: dict[str, int] = {}


def test_model_built_in_configure_model_is_quantized_while_built():
    module = BuildsInConfigureModel()
    _trainer(2, [LoRA(r=4)], FourBitPrecision()).fit(module, _loader(2))
    assert seen["quantized_while_building"] == 14  # layer by layer, before convert_module ran
    wrapped = [m for _, m in lora_layers(module.backbone)]
    assert len(wrapped) == 14 and all(is_4bit(m.base_layer) for m in wrapped)
    assert not is_4bit(module.backbone.lm_head)


def test_trainer_init_module_quantizes_while_building():
    from transformers import LlamaForCausalLM

    plugin = FourBitPrecision()
    trainer = _trainer(1, [], plugin)
    with trainer.init_module():
        model = LlamaForCausalLM(tiny_llama_config(num_layers=1))
    assert sum(is_4bit(m) for m in model.modules()) == 7 and not is_4bit(model.lm_head)


def test_load_through_the_plugin_then_train(tmp_path):
    tiny_llama(hidden=64).save_pretrained(tmp_path)
    plugin = FourBitPrecision()
    module = CausalLM(plugin.load(str(tmp_path)), lr=1e-2)
    assert sum(is_4bit(m) for m in module.modules()) == 14
    LoRA(r=4).apply(module)
    _trainer(1, [LoRA(r=4)], plugin).fit(module, _loader(1))
    assert {p.dtype for _, p in trainable_named_parameters(module)} == {torch.float32}


# --------------------------------------------------------------------------- the documented path streams
def test_documented_path_streams_into_four_bit_without_from_pretrained(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    tiny_llama(hidden=64).save_pretrained(tmp_path)
    module = CausalLM(str(tmp_path), lr=1e-2)
    assert module.backbone_pending  # nothing loaded at construction

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained would load the full-precision model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    plugin = FourBitPrecision()
    _trainer(2, [LoRA(r=4)], plugin).fit(module, _loader(2))
    wrapped = [m for _, m in lora_layers(module.backbone)]
    assert len(wrapped) == 14 and all(is_4bit(m.base_layer) for m in wrapped)
    # quantized while loading, before LoRA wrapped the layers
    assert len(plugin.quantized_modules) == 14
    assert all(
        n.startswith("backbone.model.layers.") and "base_layer" not in n for n in plugin.quantized_modules
    )
    assert type(module.backbone.lm_head) is nn.Linear
    assert {p.dtype for _, p in trainable_named_parameters(module)} == {torch.float32}


def test_streamed_and_preloaded_bases_quantize_bit_identically_and_train_alike(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama(hidden=64).save_pretrained(tmp_path)
    states = []
    for model in (str(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path).train()):
        torch.manual_seed(0)
        module = CausalLM(model, lr=1e-2)
        _trainer(2, [LoRA(r=4)], FourBitPrecision()).fit(module, _loader(2))
        states.append(module.state_dict())
    streamed, preloaded = states
    assert streamed.keys() == preloaded.keys()
    assert any("absmax" in k for k in streamed)  # the 4-bit codes and scales are compared too
    for name, tensor in streamed.items():
        assert torch.equal(tensor, preloaded[name]), name


@pytest.mark.parametrize("name", sorted(registry()))
def test_streaming_leaves_what_each_method_trains_in_full_precision(tmp_path, name):
    """Streaming quantizes before any method is applied, yet the same layers as after it."""
    from transformers import AutoModelForCausalLM

    cls = registry()[name]
    tiny_llama(hidden=64).save_pretrained(tmp_path)
    runs = []
    for model in (str(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path).train()):
        torch.manual_seed(0)
        module = CausalLM(model, lr=1e-2)
        callback = getattr(lightning_peft.callbacks, cls.callback_name)(**dict(cls.example))
        _trainer(1, [callback], FourBitPrecision()).fit(module, _loader(1))
        trained = dict(trainable_named_parameters(module))
        assert all(p.is_floating_point() and p.dtype == torch.float32 for p in trained.values())
        runs.append(({n for n, m in module.named_modules() if is_4bit(m)}, trained))
    (streamed, trained_s), (preloaded, trained_p) = runs
    assert streamed == preloaded and trained_s.keys() == trained_p.keys()
    if name != "prefix":  # prefixes start from the activations of the base they meet: 4-bit when streamed
        assert all(torch.equal(trained_s[n], trained_p[n]) for n in trained_s), name


def test_documented_path_checkpoint_resumes_and_loads_without_a_trainer(tmp_path):
    folder = tmp_path / "base"
    tiny_llama(hidden=64).save_pretrained(folder)
    module = CausalLM(str(folder), lr=1e-2)
    trainer = _trainer(2, [LoRA(r=4)], FourBitPrecision())
    trainer.fit(module, _loader(2))
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    trained = _lora_snapshot(module)
    resumed = CausalLM(str(folder), lr=1e-2)
    again = _trainer(3, [LoRA(r=4)], FourBitPrecision())
    again.fit(resumed, _loader(2), ckpt_path=tmp_path / "q.ckpt")  # fingerprint of the same 4-bit base
    assert again.global_step == 3 and sum(is_4bit(m) for m in resumed.modules()) == 14
    # No Trainer, no plugin: the full-precision base from the recorded path, the deltas on top.
    loaded = CausalLM.load_from_checkpoint(tmp_path / "q.ckpt")
    assert not any(is_4bit(m) for m in loaded.modules())
    assert {n: p for n, p in _lora_snapshot(loaded).items()}.keys() == trained.keys()
    assert all(torch.equal(p, trained[n]) for n, p in _lora_snapshot(loaded).items())


def test_documented_path_without_safetensors_falls_back_with_a_warning(tmp_path):
    model = tiny_llama(hidden=64)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    module = CausalLM(str(tmp_path), lr=1e-2)
    with pytest.warns(UserWarning, match="safetensors.*full precision instead"):
        _trainer(1, [LoRA(r=4)], FourBitPrecision()).fit(module, _loader(1))
    assert sum(is_4bit(m) for m in module.modules()) == 14  # quantized by convert_module instead


# --------------------------------------------------------------------------- merge and export
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_export_merged_over_four_bit_base_loads_in_bare_transformers(tmp_path, factory):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    module = CausalLM(factory(), lr=2e-2)
    _trainer(3, [LoRA(r=4)], FourBitPrecision()).fit(module, _loader())
    trained = _logits(module)
    with pytest.raises(ValueError, match="quantized"):
        lightning_peft.merge(module)  # folding into 4-bit codes would lose the update
    lightning_peft.export_merged(module, tmp_path, dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "model.safetensors")
    assert not any("lora" in k or "absmax" in k or "quant" in k for k in tensors)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert _cos(_logits(plain), trained) > 0.98
    errors = requantization_error(module, random_batch(seed=7))
    assert errors["cosine_merged"] > 0.98 and errors["layers"] > 0


# --------------------------------------------------------------------------- checkpoints and resume
def test_delta_checkpoint_over_four_bit_base_resumes(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    straight = CausalLM(tiny_llama(), lr=1e-2)
    _trainer(4, [LoRA(r=4), saver], FourBitPrecision()).fit(straight, _loader(2))  # 2 epochs of 2 steps
    ckpt = torch.load(tmp_path / "step=2.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])  # deltas only
    assert ckpt["FourBitPrecision"]["quant_type"] == "nf4"  # the plugin's settings travel along
    resumed = CausalLM(tiny_llama(), lr=1e-2)
    trainer = _trainer(4, [LoRA(r=4)], FourBitPrecision())
    trainer.fit(resumed, _loader(2), ckpt_path=tmp_path / "step=2.ckpt")
    assert trainer.global_step == 4
    for (n, a), (m, b) in zip(trainable_named_parameters(straight), trainable_named_parameters(resumed)):
        assert n == m and torch.allclose(a, b, atol=1e-6), n
    straight_state, resumed_state = straight.state_dict(), resumed.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    for name, tensor in straight_state.items():
        assert torch.equal(tensor, resumed_state[name]), name  # the base re-quantized bit for bit


# --------------------------------------------------------------------------- settings and strategies
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quant_type": "nf5"}, "quant_type"),
        ({"compute_dtype": torch.int32}, "compute_dtype"),
        ({"compute_dtype": "int8"}, "compute_dtype"),
        ({"blocksize": 100}, "blocksize"),
        ({"double_quant": 1}, "double_quant"),
        ({"skip_modules": [""]}, "skip_modules"),
        ({"skip_modules": [3]}, "skip_modules"),
        ({"quantize_heads": "no"}, "quantize_heads"),
    ],
)
def test_invalid_plugin_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FourBitPrecision(**kwargs)


def test_plugin_is_accepted_by_the_trainer_and_skips_named_modules():
    plugin = FourBitPrecision("nf4", compute_dtype="bfloat16", skip_modules="down_proj")
    trainer = _trainer(1, [LoRA(r=4)], plugin)
    assert trainer.precision_plugin is plugin
    module = CausalLM(tiny_llama())
    trainer.fit(module, _loader(1))
    assert not any(n.endswith("down_proj.base_layer") for n in plugin.quantized_modules)
    assert sum(is_4bit(m) for m in module.modules()) == 12


@pytest.mark.parametrize("name", ["FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"])
def test_sharding_strategies_are_refused_in_convert_module(name):
    import lightning.pytorch.strategies as strategies

    cls = getattr(strategies, name)
    strategy = cls.__new__(cls)  # DeepSpeed is not installed here; only the type matters
    with pytest.raises(RuntimeError, match=f"does not support {name}.*ddp"):
        check_strategy(strategy)
    module = CausalLM(tiny_llama())
    LoRA(r=4).apply(module)
    module._trainer = SimpleNamespace(strategy=strategy)  # what strategy.setup hands to convert_module
    with pytest.raises(RuntimeError, match=f"does not support {name}"):
        FourBitPrecision().convert_module(module)
    assert not any(is_4bit(m) for m in module.modules())  # refused before touching the model
    check_strategy(strategies.DDPStrategy())  # supported: no error
    check_strategy(strategies.SingleDeviceStrategy("cpu"))


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@cuda
def test_qlora_on_cuda_quantizes_on_device_and_trains():
    module = CausalLM(tiny_llama(hidden=256), lr=1e-2)
    before = _lora_snapshot(LoRA(r=4).apply(module))
    seen = []

    class Devices(Callback):  # Lightning moves the model back to the CPU when fit ends
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            layer = next(m for m in pl_module.modules() if is_4bit(m))
            seen.append((layer.weight.device.type, layer.weight.quant_state.absmax.device.type))

    _trainer(3, [LoRA(r=4), Devices()], FourBitPrecision(), accelerator="cuda").fit(module, _loader(2))
    assert seen and all(s == ("cuda", "cuda") for s in seen), seen
    assert bits_per_parameter(module) <= 4.13
    after = _lora_snapshot(module)
    assert all(not torch.equal(after[n].cpu(), before[n]) for n in before if n.endswith("lora_b"))


@pytest.mark.gpu
@cuda
def test_fsdp_fit_is_refused_before_training():
    from lightning.pytorch.strategies import FSDPStrategy

    module = CausalLM(tiny_llama())
    # Lightning itself refuses any precision plugin but its own under FSDPStrategy when the
    # Trainer is built; our plugin's check (``check_strategy``) backs this up at fit.
    with pytest.raises((TypeError, RuntimeError), match="FSDP"):
        trainer = _trainer(1, [LoRA(r=4)], FourBitPrecision(), strategy=FSDPStrategy(), accelerator="cuda")
        trainer.fit(module, _loader(1))
    assert not any(is_4bit(m) for m in module.modules())


# --------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import torch
from conftest import tiny_llama
from lightning_peft import CausalLM
from lightning_peft.callbacks import LoRA
from lightning_peft.methods.base import registry, trainable_named_parameters
from lightning_peft.methods.lora import lora_layers
from lightning_peft.plugins import FourBitPrecision
from lightning_peft.core.layers import is_4bit

module = CausalLM(tiny_llama(), lr=1e-2)
t = trainer(2, strategy="ddp", devices=2, callbacks=[LoRA(r=4)], plugins=[FourBitPrecision()])
t.fit(module, loader("lm", n=4, batch=2))
out = {k: v for k, v in trainable_named_parameters(module)}
for name, m in module.named_modules():
    if is_4bit(m):
        out[name + ".codes"] = m.weight.data.flatten()[:256]
        out[name + ".absmax"] = m.weight.quant_state.absmax
save_rank(t, out)
"""


@pytest.mark.slow
def test_ddp_ranks_hold_the_same_four_bit_base_and_lora(tmp_path):
    from distributed import TRAIN_PRELUDE, run_script

    r0, r1 = run_script(TRAIN_PRELUDE + DDP_SCRIPT, tmp_path)
    assert r0.keys() == r1.keys()
    assert sum(k.endswith(".codes") for k in r0) == 14
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ on {key}"


# --------------------------------------------------------------------------- recipe
def test_qlora_recipe_runs_two_steps_with_the_plugin(minilm_path, tmp_path, monkeypatch):
    cli = fit_recipe(
        "minilm-sentiment/qlora.yaml",
        tmp_path,
        monkeypatch,
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
    )
    plugin = cli.trainer.precision_plugin
    assert (
        isinstance(plugin, FourBitPrecision) and plugin.spec.quant_type == "nf4" and plugin.spec.double_quant
    )
    assert cli.trainer.global_step == 2
    module = cli.model
    # streamed into 4-bit while the run was set up (before LoRA wrapped the layers)
    assert plugin.quantized_modules and all(
        n.startswith("backbone.") and "base_layer" not in n for n in plugin.quantized_modules
    )
    wrapped = [m for _, m in lora_layers(module)]
    assert wrapped and all(is_4bit(m.base_layer) for m in wrapped)
    assert not is_4bit(module.backbone.classifier)
    assert bits_per_parameter(module) <= 4.13
