"""Several adapters on one base: name, switch, freeze, disable, delete, route per row, combine, save, export."""

from __future__ import annotations

import lightning as L
import peft_runs
import pytest
import torch

import lightning_peft as lp
from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.callbacks import IA3, Adapter, LoRA, PrefixTuning, PromptTuning
from lightning_peft.core.heads import ModuleCopies
from lightning_peft.core.ownership import owned_tensors
from lightning_peft.methods import MethodError
from lightning_peft.methods.base import trainable_parameter_names
from lightning_peft.methods.lora import lora_layers
from lightning_peft.persistence import delta_state_dict

from conftest import random_batch, tiny_bert_classifier, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
ROUTABLE = {
    "lora": lambda n: LoRA(r=4, adapter_name=n),
    "dora": lambda n: LoRA(r=4, use_dora=True, adapter_name=n),
    "ia3": lambda n: IA3(adapter_name=n),
    "adapter": lambda n: Adapter(bottleneck=8, adapter_name=n),
    "prompt": lambda n: PromptTuning(num_virtual_tokens=3, adapter_name=n),
    "prefix": lambda n: PrefixTuning(num_virtual_tokens=3, adapter_name=n),
}


def _perturb(model, seed: int = 0, adapter: str | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owned in owned_tensors(model, None if adapter is None else [adapter]):
            if owned.adapter == (adapter or owned.adapter) and owned.tensor.is_floating_point():
                owned.tensor.add_(torch.randn(owned.tensor.shape, generator=g) * 0.1)


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _two(kind: str, factory=tiny_llama):
    model = factory()
    ROUTABLE[kind]("a").apply(model)
    ROUTABLE[kind]("b").apply(model)
    _perturb(model)
    return model


# --------------------------------------------------------------------------- names and switching
def test_names_switch_and_bad_names_are_refused_naming_those_that_exist():
    model = _two("lora")
    assert lp.adapter_names(model) == ["a", "b"]
    with pytest.raises(ValueError, match=r"no adapter named \['c'\].*adapters on this model: \['a', 'b'\]"):
        lp.set_adapter(model, "c")
    with pytest.raises(ValueError, match="no adapter named"):
        lp.adapter_per_row(model, ["a", "zz"]).__enter__()
    with pytest.raises(ValueError, match="is already on this model"):
        LoRA(r=8, adapter_name="a").apply(model)
    with pytest.raises(ValueError, match="adapter_name must be letters"):
        LoRA(adapter_name="bad name")


def test_the_new_adapter_trains_and_runs_alone_until_the_user_chooses():
    model = _two("lora")
    batch = random_batch()
    assert {n.split(".lora.")[1].split(".")[0] for n in trainable_parameter_names(model)} == {"b"}
    both = _logits(lp.set_adapter(model, ["a", "b"]), batch)
    assert {n.split(".lora.")[1].split(".")[0] for n in trainable_parameter_names(model)} == {"a", "b"}
    lp.set_adapter(model, "a")
    only_a = _logits(model, batch)
    assert not torch.allclose(only_a, both)
    lp.set_trainable(model, ["b"])  # decoupled: a runs, b trains
    assert all(".lora.b." in n for n in trainable_parameter_names(model))
    lp.set_adapter(model, "b")
    assert all(".lora.b." in n for n in trainable_parameter_names(model))
    lp.set_trainable(model, [])
    assert trainable_parameter_names(model) == []


def test_active_adapters_add_up():
    model = _two("lora")
    batch = random_batch()
    base = lp.disable_adapters(model)
    with base:
        ref = _logits(model, batch)
    lp.set_adapter(model, ["a", "b"])
    both = _logits(model, batch) - ref
    lp.set_adapter(model, "a")
    a = _logits(model, batch) - ref
    lp.set_adapter(model, "b")
    b = _logits(model, batch) - ref
    assert not torch.allclose(both, a) and not torch.allclose(both, b)


# --------------------------------------------------------------------------- disable, delete
@pytest.mark.parametrize("kind", list(ROUTABLE))
def test_disable_gives_the_base_function_exactly(kind):
    base = tiny_llama()
    batch = random_batch()
    ref = _logits(base, batch)
    model = _two(kind)
    with lp.disable_adapters(model):
        torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=0)
    assert not torch.equal(_logits(model, batch), ref)


@pytest.mark.parametrize("kind", list(ROUTABLE))
def test_delete_leaves_the_others_exact_and_the_model_as_if_never_added(kind):
    batch = random_batch()
    only_a = tiny_llama()
    ROUTABLE[kind]("a").apply(only_a)
    _perturb(only_a)
    model = tiny_llama()
    ROUTABLE[kind]("a").apply(model)
    _perturb(model)
    ROUTABLE[kind]("b").apply(model)
    _perturb(model, seed=1, adapter="b")
    lp.delete_adapter(model, "b")
    assert lp.adapter_names(model) == ["a"]
    assert list(model.state_dict()) == list(only_a.state_dict())
    torch.testing.assert_close(_logits(model, batch), _logits(only_a, batch), rtol=0, atol=0)
    lp.delete_adapter(model, "a")
    torch.testing.assert_close(_logits(model, batch), _logits(tiny_llama(), batch), rtol=0, atol=0)
    assert list(model.state_dict()) == list(tiny_llama().state_dict())


def test_partial_and_merged_adapters_cannot_be_disabled():
    model = tiny_llama()
    lp.callbacks.PartialFinetuning(parts=["layernorm"], adapter_name="norms").apply(model)
    with pytest.raises(MethodError, match="changed the base weights in place"):
        lp.disable_adapters(model).__enter__()
    other = _two("lora")
    lp.set_adapter(other, "a")
    lp.merge(other)
    with pytest.raises(MethodError, match="unmerge"):
        lp.disable_adapters(other).__enter__()


# --------------------------------------------------------------------------- per-row routing
@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert_classifier])
@pytest.mark.parametrize("kind", list(ROUTABLE))
def test_a_mixed_batch_equals_each_row_run_with_its_own_adapter(kind, factory):
    model = _two(kind, factory)
    batch = random_batch(batch=4)
    want = {}
    for name in ("a", "b"):
        lp.set_adapter(model, name)
        want[name] = _logits(model, batch)
    with lp.disable_adapters(model):
        want[None] = _logits(model, batch)
    names = ["b", None, "a", "b"]
    with lp.adapter_per_row(model, names):
        got = _logits(model, batch)
    for row, name in enumerate(names):
        torch.testing.assert_close(got[row], want[name][row], rtol=0, atol=1e-5, msg=f"row {row} ({name})")


@pytest.mark.parametrize("seq", [1, 5])
def test_lora_routing_with_one_or_many_tokens_per_row_follows_weight_and_routing_changes(seq):
    """One token per row (a generation step) and longer rows take different kernels; stacked
    factors kept between forwards must follow new weights, a new routing and new adapters."""
    model = _two("lora")
    batch = random_batch(batch=4, seq=seq)

    def expected(names):
        want = {}
        for name in set(names) - {None}:
            lp.set_adapter(model, name)
            want[name] = _logits(model, batch)
        with lp.disable_adapters(model):
            want[None] = _logits(model, batch)
        return torch.stack([want[n][row] for row, n in enumerate(names)])

    for names in (["b", None, "a", "b"], ["a", "a", None, "b"]):
        with lp.adapter_per_row(model, names):
            got = _logits(model, batch)
            again = _logits(model, batch)  # served from the kept factors
        torch.testing.assert_close(got, expected(names), rtol=0, atol=1e-5)
        torch.testing.assert_close(again, got, rtol=0, atol=0)
    _perturb(model, seed=5, adapter="a")  # in-place update, as an optimizer step makes
    names = ["a", "b", "a", None]
    with lp.adapter_per_row(model, names):
        got = _logits(model, batch)
    torch.testing.assert_close(got, expected(names), rtol=0, atol=1e-5)
    LoRA(r=2, adapter_name="c").apply(model)
    _perturb(model, seed=6, adapter="c")
    names = ["c", "a", "b", "c"]  # no more rows than slots: each row's factors are kept too
    with lp.adapter_per_row(model, names):
        got = _logits(model, batch)
    torch.testing.assert_close(got, expected(names), rtol=0, atol=1e-5)
    _perturb(model, seed=7, adapter="c")
    with lp.adapter_per_row(model, names):  # the same routing in a new context, new weights
        got = _logits(model, batch)
    torch.testing.assert_close(got, expected(names), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seq", [1, 5])
@pytest.mark.parametrize("names", [["b", None, "a", "b"], ["a", None, "b"]], ids=["grouped", "per-row"])
def test_routed_lora_with_gradients_equals_inference_and_trains_only_each_row_s_adapter(names, seq):
    """More rows than adapters (grouped products) or not (each row's own factors), with and without gradients."""
    model = _two("lora").eval()
    lp.set_trainable(model, ["a", "b"])
    batch = random_batch(batch=len(names), seq=seq)
    with lp.adapter_per_row(model, names):
        with torch.no_grad():
            want = model(**batch).logits
        got = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    got[[row for row, name in enumerate(names) if name == "a"]].sum().backward()
    layers = lora_layers(model)
    grads = {n: [layer.lora[n].lora_b.grad for _, layer in layers] for n in ("a", "b")}
    assert all(g is not None for g in grads["a"]) and sum(float(g.abs().sum()) for g in grads["a"]) > 0
    assert all(g is None or g.abs().sum() == 0 for g in grads["b"])


def test_prompts_of_different_lengths_cannot_share_a_batch():
    model = tiny_llama()
    PromptTuning(num_virtual_tokens=3, adapter_name="a").apply(model)
    PromptTuning(num_virtual_tokens=5, adapter_name="b").apply(model)
    with pytest.raises(MethodError, match="different lengths"):
        lp.adapter_per_row(model, ["a", "b"]).__enter__()


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_generate_and_predict_route_rows_through_a_batch_key(kind):
    module = CausalLM(tiny_llama())
    ROUTABLE[kind]("a").apply(module)
    ROUTABLE[kind]("b").apply(module)
    _perturb(module)
    module.eval()
    prompt = random_batch(batch=2, seq=5)
    outputs = {}
    for name in ("a", "b"):
        lp.set_adapter(module, name)
        outputs[name] = module.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = module.generate(
        **prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, adapter_names=["b", "a"]
    )
    assert torch.equal(mixed[0], outputs["b"][0]) and torch.equal(mixed[1], outputs["a"][1])
    batch = random_batch(batch=2, labels="lm")
    per_row = module.predict_step({**batch, "adapter_names": ["a", "b"]}, 0)
    lp.set_adapter(module, "a")
    assert torch.allclose(per_row[0], module.predict_step(batch, 0)[0], atol=1e-5)


# --------------------------------------------------------------------------- combining
def test_cat_combination_equals_both_active_with_those_weights():
    model = _two("lora")
    batch = random_batch()
    lp.add_weighted_adapter(model, {"a": 1.0, "b": 1.0}, "ab", combination="cat")
    assert lp.adapter_names(model) == ["a", "b", "ab"] and "ab" not in lp.merging.active_adapters(model)
    lp.set_adapter(model, ["a", "b"])
    both = _logits(model, batch)
    lp.set_adapter(model, "ab")
    torch.testing.assert_close(_logits(model, batch), both, rtol=0, atol=1e-5)
    lp.add_weighted_adapter(model, {"a": 0.5, "b": -2.0}, "weighted", combination="cat")
    layer = model.model.layers[0].self_attn.q_proj
    want = 0.5 * layer.lora["a"].delta_weight() - 2.0 * layer.lora["b"].delta_weight()
    torch.testing.assert_close(layer.lora["weighted"].delta_weight(), want, rtol=0, atol=1e-6)


def test_svd_is_exact_when_the_rank_covers_the_sum_and_best_otherwise():
    model = _two("lora")
    layer = model.model.layers[0].self_attn.q_proj
    want = 0.7 * layer.lora["a"].delta_weight() + 0.3 * layer.lora["b"].delta_weight()
    lp.add_weighted_adapter(model, {"a": 0.7, "b": 0.3}, "full", combination="svd", rank=8)
    torch.testing.assert_close(layer.lora["full"].delta_weight(), want, rtol=0, atol=1e-5)
    lp.add_weighted_adapter(model, {"a": 0.7, "b": 0.3}, "small", combination="svd", rank=2)
    error = (layer.lora["small"].delta_weight() - want).norm()
    s = torch.linalg.svdvals(want.double())
    torch.testing.assert_close(error.double(), s[2:].norm(), rtol=1e-4, atol=1e-6)  # Eckart-Young


def test_linear_ties_and_dare_make_adapters_of_the_documented_rank():
    model = _two("lora")
    lp.add_weighted_adapter(model, {"a": 1.0}, "same", combination="linear")
    layer = model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(
        layer.lora["same"].delta_weight(), layer.lora["a"].delta_weight(), atol=1e-6, rtol=0
    )
    for combination in ("ties", "dare_linear"):
        lp.add_weighted_adapter(
            model, {"a": 1.0, "b": 0.5}, combination, combination=combination, rank=3, density=0.3
        )
        assert layer.lora[combination].r == 3 and torch.isfinite(layer.lora[combination].delta_weight()).all()
    with pytest.raises(ValueError, match="combination must be one of"):
        lp.add_weighted_adapter(model, {"a": 1.0}, "x", combination="magic")
    ia3 = _two("ia3")
    with pytest.raises(MethodError, match="cannot be combined"):
        lp.add_weighted_adapter(ia3, {"a": 1.0, "b": 1.0}, "ab")


# --------------------------------------------------------------------------- heads per adapter
def test_each_adapter_owns_its_head_and_the_original_comes_back():
    base = tiny_bert_classifier()
    batch = random_batch()
    ref = _logits(base, batch)
    model = tiny_bert_classifier()
    LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"], adapter_name="sentiment").apply(model)
    LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"], adapter_name="topic").apply(model)
    assert isinstance(model.classifier, ModuleCopies) and list(model.classifier.copies) == [
        "sentiment",
        "topic",
    ]
    with torch.no_grad():
        model.classifier.copies["topic"].module.weight.add_(1.0)
    lp.set_adapter(model, "sentiment")
    torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=0)  # its head is an untouched copy
    lp.set_adapter(model, "topic")
    assert not torch.allclose(_logits(model, batch), ref)
    with lp.adapter_per_row(model, ["sentiment", "topic"]):
        mixed = _logits(model, batch)
    torch.testing.assert_close(mixed[0], ref[0], rtol=0, atol=1e-6)
    assert set(delta_state_dict(model, ["topic"])) >= {"classifier.copies.topic.module.weight"}
    lp.delete_adapter(model, "topic")
    lp.delete_adapter(model, "sentiment")
    assert not isinstance(model.classifier, ModuleCopies)
    torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- saving and exporting
def test_save_and_load_one_adapter_or_all_under_saved_or_new_names(tmp_path):
    model = _two("lora")
    batch = random_batch()
    lp.save_delta(model, tmp_path / "all")
    lp.save_delta(model, tmp_path / "b", adapter_name="b")
    fresh = lp.load_delta(tiny_llama(), tmp_path / "all")
    assert lp.adapter_names(fresh) == ["a", "b"]
    for name in ("a", "b"):
        lp.set_adapter(model, name)
        lp.set_adapter(fresh, name)
        torch.testing.assert_close(_logits(fresh, batch), _logits(model, batch), rtol=0, atol=0)
    renamed = lp.load_delta(tiny_llama(), tmp_path / "b", adapter_name="topic")
    assert lp.adapter_names(renamed) == ["topic"]
    torch.testing.assert_close(_logits(renamed, batch), _logits(model, batch), rtol=0, atol=0)  # model runs b
    picked = lp.load_delta(tiny_llama(), tmp_path / "all", adapter_name="a")
    assert lp.adapter_names(picked) == ["a"]


def test_peft_multi_adapter_layout_loads_in_peft_by_adapter_name(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    LoRA(r=4, adapter_name="default").apply(model)
    LoRA(r=2, target_modules=["q_proj"], adapter_name="math").apply(model)
    _perturb(model)
    lp.export_peft(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (
        tmp_path / "math" / "adapter_config.json"
    ).is_file()
    batch = random_batch()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    theirs.load_adapter(tmp_path / "math", adapter_name="math")
    for name in ("default", "math"):
        lp.set_adapter(model, name)
        theirs.set_adapter(name)
        torch.testing.assert_close(_logits(theirs, batch), _logits(model, batch), rtol=0, atol=1e-5)
    ours = lp.import_peft(tiny_llama(), tmp_path)
    assert lp.adapter_names(ours) == ["default", "math"]
    lp.set_adapter(ours, "math")
    torch.testing.assert_close(_logits(ours, batch), _logits(model, batch), rtol=0, atol=1e-6)
    single = lp.import_peft(tiny_llama(), tmp_path, adapter_name="math")
    assert lp.adapter_names(single) == ["math"]


# --------------------------------------------------------------------------- in a Trainer
def _classifier() -> SequenceClassifier:
    return SequenceClassifier(peft_runs.classifier(), num_labels=2, lr=1e-2, schedule="constant")


def test_a_second_adapter_trained_in_a_trainer_leaves_the_first_bit_identical(tmp_path):
    module = _classifier()
    peft_runs.trainer(2, callbacks=[LoRA(r=2, adapter_name="first")]).fit(
        module, datamodule=peft_runs.loader(4)
    )
    first = {k: v.clone() for k, v in delta_state_dict(module, ["first"]).items() if ".lora.first." in k}
    trainer = peft_runs.trainer(2, callbacks=[LoRA(r=2, adapter_name="second")])
    trainer.fit(module, datamodule=peft_runs.loader(4))
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in held for n, p in module.named_parameters() if ".lora.first." in n)
    for key, value in first.items():
        assert torch.equal(delta_state_dict(module)[key], value), key
    assert lp.merging.active_adapters(module)[-1].adapter_name == "second"
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    restored = SequenceClassifier.load_from_checkpoint(tmp_path / "two.ckpt", model=peft_runs.classifier())
    assert lp.adapter_names(restored) == ["first", "second"]
    for key, value in delta_state_dict(module).items():
        assert torch.equal(delta_state_dict(restored)[key], value), key


def test_two_callbacks_in_one_trainer_train_both_adapters():
    module = _classifier()
    callbacks = [LoRA(r=2, target_modules=["query"], adapter_name="x"), IA3(adapter_name="y")]
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    trainer.fit(module, datamodule=peft_runs.loader(4))
    names = trainable_parameter_names(module)
    assert any(".lora.x." in n for n in names) and any(".ia3.y." in n for n in names)


def test_resuming_a_two_adapter_run_restores_both_and_trains_only_the_second(tmp_path):
    module = _classifier()
    peft_runs.trainer(2, callbacks=[LoRA(r=2, adapter_name="first")]).fit(
        module, datamodule=peft_runs.loader(4)
    )
    trainer = peft_runs.trainer(-1, callbacks=[LoRA(r=2, adapter_name="second")], max_epochs=1)
    trainer.fit(module, datamodule=peft_runs.loader(4))
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    straight = peft_runs.trainer(-1, callbacks=[LoRA(r=2, adapter_name="second")], max_epochs=2)
    straight.fit(module, datamodule=peft_runs.loader(4), ckpt_path=tmp_path / "one.ckpt")
    fresh = _classifier()
    resumed = peft_runs.trainer(-1, callbacks=[LoRA(r=2, adapter_name="second")], max_epochs=2)
    resumed.fit(fresh, datamodule=peft_runs.loader(4), ckpt_path=tmp_path / "one.ckpt")
    assert lp.adapter_names(fresh) == ["second", "first"] or lp.adapter_names(fresh) == ["first", "second"]
    held = {id(p) for group in resumed.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for n, p in fresh.named_parameters() if ".lora.second." in n or "classifier" in n}
    want, got = delta_state_dict(module), delta_state_dict(fresh)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
