"""LoRA, rsLoRA and DoRA: shapes, counts, init, training, 4-bit bases, the PEFT format."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_peft import CausalLM, SequenceClassifier, merge, unmerge
from lightning_peft.callbacks import LoRA
from lightning_peft.methods.base import (
    count_parameters,
    trainable_named_parameters,
    trainable_parameter_names,
)
from lightning_peft.methods.lora import LoRAConfig, LoRALinear, lora_layer, lora_layers

from conftest import RECIPES, fit_recipe, random_batch, tiny_bert_classifier, tiny_gpt2, tiny_llama


def _trainer(steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _loader(labels: str, n: int = 4):
    batches = [random_batch(labels=labels, seed=i, batch=4) for i in range(n)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def _perturb(model: nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Give every adapter a non-zero update (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora["default"].lora_b.copy_(
                torch.randn(layer.lora["default"].lora_b.shape, generator=g) * std
            )
            if layer.lora["default"].magnitude is not None:
                layer.lora["default"].magnitude.mul_(
                    1 + 0.1 * torch.randn(layer.lora["default"].magnitude.shape, generator=g)
                )


def _linear_names(model: nn.Module) -> set[str]:
    from lightning_peft.core.targeting import LINEAR_TYPES

    return {n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}


# --------------------------------------------------------------------------- counts and targets
def test_roberta_base_query_value_count_on_meta():
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):
        model = RobertaModel(RobertaConfig())  # d=768, 12 layers
    LoRA(r=8, target_modules=["query", "value"]).apply(model)
    trainable, _ = count_parameters(model)
    assert trainable == 294_912
    assert all(p.device.type == "meta" for _, p in trainable_named_parameters(model))


def test_gpt3_shaped_q_v_count_on_meta_allocates_nothing():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=12288,
        intermediate_size=4 * 12288,
        num_hidden_layers=96,
        num_attention_heads=96,
        num_key_value_heads=96,
        vocab_size=50257,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    LoRA(r=8, target_modules=["q_proj", "v_proj"]).apply(model)
    trainable, total = count_parameters(model)
    assert trainable == 37_748_736
    assert total > 10**11
    assert all(p.device.type == "meta" for p in model.parameters())


def test_all_linear_adapts_every_linear_but_the_head():
    llama = tiny_llama()
    linears = _linear_names(llama)
    LoRA(r=2).apply(llama)
    assert {n for n, _ in lora_layers(llama)} == linears - {"lm_head"}
    assert len(linears) == 2 * 7 + 1

    gpt2 = tiny_gpt2()
    linears = _linear_names(gpt2)
    LoRA(r=2).apply(gpt2)
    adapted = {n for n, _ in lora_layers(gpt2)}
    assert adapted == linears - {"lm_head"}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"c_attn", "c_proj", "c_fc"}

    bert = tiny_bert_classifier()
    linears = _linear_names(bert)
    LoRA(r=2).apply(bert)
    assert {n for n, _ in lora_layers(bert)} == linears - {"classifier"}


def test_exclude_modules_and_regex_targets():
    model = LoRA(r=2, target_modules=r".*self_attn\.(q|k|v)_proj", exclude_modules=["k_proj"]).apply(
        tiny_llama()
    )
    names = {n for n, _ in lora_layers(model)}
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def test_trainable_names_are_only_lora_and_base_is_frozen():
    model = LoRA(r=4, target_modules=["q_proj", "v_proj"]).apply(tiny_llama())
    names = set(trainable_parameter_names(model))
    assert names == {f"{n}.lora.default.lora_{ab}" for n, _ in lora_layers(model) for ab in "ab"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in names)
    # r * (in + out) per layer: q is 64x64, v is 64x32 (grouped-query attention)
    assert count_parameters(model)[0] == 2 * (4 * (64 + 64) + 4 * (64 + 32))


def test_modules_to_save_train_in_full_as_the_adapter_s_own_copy():
    model = LoRA(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]).apply(tiny_llama())
    names = set(trainable_parameter_names(model))
    assert "lm_head.copies.default.module.weight" in names
    assert model.lm_head.copies["default"].module.weight.requires_grad
    assert not model.lm_head.base_layer.weight.requires_grad  # the original stays for the base function
    with pytest.raises(ValueError, match="modules_to_save"):
        LoRA(r=2, target_modules=["q_proj"], modules_to_save=["self_attn"]).apply(tiny_llama())


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "positive integer"),
        ({"r": -4}, "positive integer"),
        ({"r": 2.5}, "positive integer"),
        ({"alpha": 0}, "alpha must be a positive"),
        ({"alpha": -1.0}, "alpha must be a positive"),
        ({"dropout": 1.0}, r"\[0, 1\)"),
        ({"dropout": -0.1}, r"\[0, 1\)"),
        ({"target_modules": []}, "target_modules"),
        ({"exclude_modules": "all-linear"}, "only allowed for target_modules"),
        ({"use_dora": "yes"}, "use_dora must be True or False"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRA(**kwargs)


def test_bad_targets_fail_at_apply_naming_the_fix():
    with pytest.raises(ValueError, match="matches no module.*q_proj") as info:
        LoRA(target_modules=["query"]).apply(tiny_llama())
    assert "v_proj" in str(info.value)


def test_a_typo_in_a_target_list_is_refused_with_a_suggestion():
    with pytest.raises(ValueError, match=r"entry 'v_prj' matches no module.*did you mean 'v_proj'"):
        LoRA(target_modules=["q_proj", "v_prj"]).apply(tiny_llama())
    with pytest.raises(ValueError, match=r"exclude_modules entry 'o_prj'"):
        LoRA(target_modules="all-linear", exclude_modules=["o_prj"]).apply(tiny_llama())


def test_an_anchored_regex_picks_the_same_layers_through_the_callback():
    regex = r"model\.layers\.\d+\.self_attn\.(q|v)_proj"
    bare = LoRA(target_modules=regex).apply(tiny_llama())
    module = CausalLM(tiny_llama())
    LoRA(target_modules=regex).apply(module)
    want = {n for n, _ in lora_layers(bare)}
    assert len(want) == 4
    assert {n.removeprefix("backbone.") for n, _ in lora_layers(module)} == want
    with pytest.raises(ValueError, match="cannot adapt.*Embedding"):
        LoRA(target_modules=["embed_tokens"]).apply(tiny_llama())


def test_applying_twice_is_a_no_op_or_an_error():
    model = LoRA(r=2, target_modules=["q_proj"]).apply(tiny_llama())
    before = len(lora_layers(model))
    LoRA(r=2, target_modules=["q_proj"]).apply(model)
    assert len(lora_layers(model)) == before
    assert not any(isinstance(m.base_layer, LoRALinear) for _, m in lora_layers(model))
    with pytest.raises(ValueError, match="adapter named 'default' is already on this model"):
        LoRA(r=4, target_modules=["q_proj"]).apply(model)


# --------------------------------------------------------------------------- init and scaling
def test_init_follows_the_paper_and_leaves_the_model_unchanged():
    model = tiny_llama()
    batch = random_batch()
    ref = model(**batch).logits
    LoRA(r=4, alpha=8).apply(model)
    assert torch.equal(model(**batch).logits, ref)
    for _, layer in lora_layers(model):
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) like nn.Linear
        assert (
            layer.lora["default"].lora_a.abs().max() <= bound
            and layer.lora["default"].lora_a.std() > bound / 4
        )
        assert torch.count_nonzero(layer.lora["default"].lora_b) == 0
        assert layer.lora["default"].scale == 2.0
    rs = LoRA(r=4, alpha=8, use_rslora=True).apply(tiny_llama())
    assert all(layer.lora["default"].scale == 4.0 for _, layer in lora_layers(rs))


def test_forward_is_base_plus_scaled_low_rank():
    base = nn.Linear(16, 8)
    layer = lora_layer(base, r=2, alpha=6)
    nn.init.normal_(layer.lora["default"].lora_b)
    x = torch.randn(3, 5, 16)
    expected = base(x) + 3.0 * (x @ layer.lora["default"].lora_a.T @ layer.lora["default"].lora_b.T)
    torch.testing.assert_close(layer(x), expected)


def test_adapter_params_follow_the_layer_device_and_dtype():
    base = nn.Linear(16, 8, dtype=torch.bfloat16)
    layer = lora_layer(base, r=2, alpha=4, use_dora=True)
    assert {
        p.dtype
        for p in (layer.lora["default"].lora_a, layer.lora["default"].lora_b, layer.lora["default"].magnitude)
    } == {torch.bfloat16}
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


# --------------------------------------------------------------------------- training
def _snapshot(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Every tensor of the (not yet adapted) model: name, the live object, and a copy."""
    return [(n, t, t.detach().clone()) for n, t in module.state_dict(keep_vars=True).items()]


def _assert_only_adapters_moved(module: nn.Module, snapshot, trainable_heads=()):
    """Every base tensor (followed by identity, since LoRA renames q_proj.weight to q_proj.base_layer.weight)
    is bit-identical; at least one B moved."""
    for name, live, copy in snapshot:
        if name in trainable_heads:
            continue
        assert torch.equal(live, copy), f"frozen tensor {name} changed"
    assert any(torch.count_nonzero(layer.lora["default"].lora_b) for _, layer in lora_layers(module))


@pytest.mark.parametrize(
    ("factory", "use_dora"), [(tiny_llama, False), (tiny_gpt2, False), (tiny_llama, True)]
)
def test_causal_lm_trains_only_lora_and_merges_exactly(factory, use_dora):
    module = CausalLM(factory(), lr=1e-2)
    before = _snapshot(module)
    _trainer(3, [LoRA(r=4, alpha=8, dropout=0.1, use_dora=use_dora)]).fit(
        module, train_dataloaders=_loader("lm")
    )
    trainable = set(trainable_parameter_names(module))
    assert trainable and all(".lora_" in n or n.endswith(".magnitude") for n in trainable)
    _assert_only_adapters_moved(module, before)

    module.eval()
    batch = random_batch()
    with torch.no_grad():
        ref = module(**batch).logits
        merge(module)
        assert all(layer.merged for _, layer in lora_layers(module))
        torch.testing.assert_close(module(**batch).logits, ref, atol=1e-4, rtol=0)
        unmerge(module)
        torch.testing.assert_close(module(**batch).logits, ref, atol=1e-4, rtol=0)


def test_sequence_classifier_trains_lora_and_its_head():
    module = SequenceClassifier(tiny_bert_classifier(), num_labels=2, lr=1e-2)
    before = _snapshot(module)
    head = module.backbone.classifier.weight.detach().clone()
    _trainer(3, [LoRA(r=4, target_modules=["query", "value"])]).fit(module, train_dataloaders=_loader("cls"))
    trainable = set(trainable_parameter_names(module))
    assert {n for n in trainable if ".lora_" not in n} == {
        "backbone.classifier.weight",
        "backbone.classifier.bias",
    }
    _assert_only_adapters_moved(module, before, {"backbone.classifier.weight", "backbone.classifier.bias"})
    assert not torch.equal(module.backbone.classifier.weight, head)
    module.eval()
    batch = random_batch()
    with torch.no_grad():
        ref = module(**batch).logits
        merge(module)
        torch.testing.assert_close(module(**batch).logits, ref, atol=1e-4, rtol=0)
        unmerge(module)
        torch.testing.assert_close(module(**batch).logits, ref, atol=1e-4, rtol=0)


class _OwnModule(L.LightningModule):
    """A user's module that builds its network in configure_model."""

    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = tiny_llama()

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_user_module_building_in_configure_model():
    module = _OwnModule()
    _trainer(2, [LoRA(r=2, target_modules=["q_proj", "v_proj"])]).fit(module, train_dataloaders=_loader("lm"))
    layers = lora_layers(module)
    assert len(layers) == 4
    assert set(trainable_parameter_names(module)) == {
        f"{n}.lora.default.lora_{ab}" for n, _ in layers for ab in "ab"
    }
    assert any(torch.count_nonzero(layer.lora["default"].lora_b) for _, layer in layers)


@pytest.mark.slow
def test_ddp_two_processes_keep_lora_identical(tmp_path):
    from distributed import TRAIN_PRELUDE, run_script

    ranks = run_script(
        TRAIN_PRELUDE
        + """
from conftest import tiny_llama
from lightning_peft import CausalLM
from lightning_peft.callbacks import LoRA
from lightning_peft.methods.base import trainable_named_parameters

module = CausalLM(tiny_llama(), lr=1e-2)
# different RNG per rank: LoRA's A is drawn differently on each, DDP must broadcast rank 0's
torch.manual_seed(1234 + int(__import__("os").environ.get("LOCAL_RANK", "0")))
t = trainer(3, callbacks=[LoRA(r=4, dropout=0.1)])
t.fit(module, train_dataloaders=loader("lm"))
save_rank(t, dict(trainable_named_parameters(module)))
""",
        tmp_path,
    )
    assert len(ranks) == 2
    r0, r1 = ranks
    assert r0.keys() == r1.keys() and any("lora_a" in k for k in r0)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ on {key}"
    assert any(torch.count_nonzero(v) for k, v in r0.items() if k.endswith("lora_b"))


# --------------------------------------------------------------------------- 4-bit base
def test_four_bit_base_forward_merge_refusal_and_export(tmp_path):
    quantization = pytest.importorskip("lightning_peft.quantization")
    model = LoRA(r=4, target_modules=["q_proj", "v_proj"], use_dora=True).apply(tiny_llama())
    _perturb(model)
    for _, layer in lora_layers(model):
        layer.base_layer = quantization.quantize_linear(layer.base_layer, compute_dtype=torch.float32)
    batch = random_batch()
    with torch.no_grad():
        ref = model(**batch).logits
    snapshot = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="export_merged"):
        merge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshot.items())
    assert not any(layer.merged for _, layer in lora_layers(model))

    from transformers import AutoModelForCausalLM

    from lightning_peft import export_merged

    export_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- PEFT format
def _save_peft(config: dict, state: dict, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in state.items()},
        folder / "adapter_model.safetensors",
    )


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [
        (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
        (tiny_llama, {"use_dora": True, "use_rslora": True}),
        (tiny_gpt2, {}),
        (tiny_gpt2, {"use_dora": True, "target_modules": ["c_attn", "mlp.c_proj"]}),
        (tiny_llama, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    ],
)
def test_to_peft_loads_in_peft_with_equal_logits(tmp_path, factory, kwargs):
    from peft import PeftModel

    model = LoRA(r=4, alpha=8, **kwargs).apply(factory())
    _perturb(model)
    if kwargs.get("modules_to_save"):
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)
    config, state = LoRAConfig(r=4, alpha=8, **kwargs).to_peft(model)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] == (factory is tiny_gpt2)
    assert all(k.rsplit(".", 1)[-1] in ("weight", "lora_magnitude_vector") for k in state)
    _save_peft(config, state, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(factory(), tmp_path / "adapter").eval()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)

    # and back: PEFT's names map onto ours, the config round-trips
    again = LoRAConfig.from_peft_config(config)
    assert (again.r, again.alpha, again.use_dora, again.use_rslora) == (
        4,
        8,
        kwargs.get("use_dora", False),
        kwargs.get("use_rslora", False),
    )
    assert again.modules_to_save == kwargs.get("modules_to_save")
    fresh = again.apply(factory())
    mapped = again.from_peft(fresh, {f"base_model.model.{k}": v for k, v in state.items()})
    missing = set(trainable_parameter_names(fresh)) - set(mapped)
    assert not missing
    fresh.load_state_dict(mapped, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)


def test_to_peft_sequence_classifier_keeps_the_head(tmp_path):
    from peft import PeftModel

    module = SequenceClassifier(tiny_bert_classifier(), num_labels=2)
    LoRA(r=4, target_modules=["query", "value"]).apply(module)
    _perturb(module)
    with torch.no_grad():
        module.backbone.classifier.weight.normal_()
    config, state = LoRAConfig(r=4, target_modules=["query", "value"]).to_peft(module)
    assert config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"]
    assert config["target_modules"] == ["query", "value"]
    assert "classifier.weight" in state and "classifier.bias" in state
    _save_peft(config, state, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "adapter").eval()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, module(**batch).logits, atol=1e-5, rtol=0)


def test_from_peft_rejects_foreign_keys_and_configs():
    model = LoRA(r=2, target_modules=["q_proj"]).apply(tiny_llama())
    with pytest.raises(ValueError, match="does not have"):
        LoRAConfig(r=2).from_peft(model, {"model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 64)})
    with pytest.raises(ValueError, match="shape"):
        LoRAConfig(r=2).from_peft(
            model, {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(3, 64)}
        )
    with pytest.raises(ValueError, match="not supported"):
        LoRAConfig.from_peft_config({"peft_type": "LORA", "r": 4, "rank_pattern": {"q_proj": 8}})
    with pytest.raises(ValueError, match="not a LoRA"):
        LoRAConfig.from_peft_config({"peft_type": "IA3"})


# --------------------------------------------------------------------------- recipes


def test_minilm_lora_recipe_parses(minilm_path):
    from lightning_peft.cli import build_cli

    cli = build_cli(["--config", str(RECIPES / "minilm-sentiment" / "lora.yaml")], run=False)
    (lora,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRA)]
    assert (lora.r, lora.alpha, lora.target_modules) == (8, 16, "all-linear")
    assert isinstance(cli.model, SequenceClassifier)


def test_instruct_recipe_runs_two_steps(tmp_path, monkeypatch):
    cli = fit_recipe(
        "instruct-lm/lora.yaml",
        tmp_path,
        monkeypatch,
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
    )
    module = cli.model
    assert isinstance(module, CausalLM) and cli.trainer.global_step == 2
    layers = lora_layers(module)
    assert len(layers) == 2 * 7 and any(
        torch.count_nonzero(layer.lora["default"].lora_b) for _, layer in layers
    )
    # the random base is seeded: rebuilding it gives the same frozen weights
    fresh = CausalLM(str(RECIPES / "instruct-lm" / "tiny-llama"), init="random")
    for name, layer in layers:
        torch.testing.assert_close(layer.base_layer.weight, fresh.get_submodule(name).weight, rtol=0, atol=0)
    assert list(tmp_path.rglob("*.ckpt"))
