"""(IA)³: PEFT's IA3Config semantics, exact parameter counts, PEFT round trips, merges, several adapters."""

from __future__ import annotations

import pytest
import torch

import lightning_peft
from lightning_peft import export_peft, import_peft, merge, unmerge
from lightning_peft.callbacks import IA3
from lightning_peft.methods.base import count_parameters, trainable_parameter_names
from lightning_peft.methods.ia3 import IA3Config, IA3Linear, ia3_layers

from conftest import fit_recipe, random_batch, tiny_bert_classifier, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = {"llama": tiny_llama, "bert": tiny_bert_classifier, "gpt2": tiny_gpt2}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _perturb(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ia3_l"):
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parameter_count_and_targets_equal_peft_defaults(family):
    peft = pytest.importorskip("peft")
    ours = IA3().apply(FAMILIES[family]())
    theirs = peft.get_peft_model(FAMILIES[family](), peft.IA3Config())
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    peft_layers = {
        n.removeprefix("base_model.model."): m.is_feedforward
        for n, m in theirs.named_modules()
        if type(m).__module__.startswith("peft.tuners.ia3") and hasattr(m, "is_feedforward")
    }
    assert {n: layer.feedforward for n, layer in ia3_layers(ours)} == peft_layers


def test_vectors_scale_outputs_or_feedforward_inputs():
    model = IA3().apply(tiny_llama())
    layers = dict(ia3_layers(model))
    k = layers["model.layers.0.self_attn.k_proj"]
    down = layers["model.layers.0.mlp.down_proj"]
    assert not k.feedforward and k.ia3["default"].ia3_l.shape == (32, 1)  # (out, 1): kv width 32
    assert down.feedforward and down.ia3["default"].ia3_l.shape == (1, 128)  # (1, in): intermediate 128
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        k.ia3["default"].ia3_l.fill_(2.0)
        torch.testing.assert_close(k(x), 2 * k.base_layer(x))
        h = torch.randn(2, 3, 128)
        down.ia3["default"].ia3_l.fill_(0.5)
        torch.testing.assert_close(down(h), down.base_layer(0.5 * h))
    assert set(trainable_parameter_names(model)) == {f"{n}.ia3.default.ia3_l" for n in layers}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_loads_our_export_and_we_load_peft_s(family, tmp_path):
    peft = pytest.importorskip("peft")
    batch = random_batch()
    ours = IA3().apply(FAMILIES[family]())
    _perturb(ours)
    export_peft(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(FAMILIES[family](), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, batch), _logits(ours, batch), rtol=0, atol=1e-6)

    native = peft.get_peft_model(FAMILIES[family](), peft.IA3Config(target_modules=None))
    _perturb(native, seed=1)
    native.save_pretrained(tmp_path / "theirs")
    loaded = import_peft(FAMILIES[family](), tmp_path / "theirs")
    torch.testing.assert_close(_logits(loaded, batch), _logits(native, batch), rtol=0, atol=1e-6)


def test_a_classifier_s_trained_head_goes_into_the_peft_export(tmp_path):
    peft = pytest.importorskip("peft")
    from lightning_peft import SequenceClassifier

    batch = random_batch()
    module = SequenceClassifier(tiny_bert_classifier(), num_labels=2)  # its new head trains
    IA3().apply(module)
    _perturb(module)
    with torch.no_grad():
        module.backbone.classifier.weight.add_(0.5)
    export_peft(module, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, batch), _logits(module, batch), rtol=0, atol=1e-6)
    loaded = import_peft(SequenceClassifier(tiny_bert_classifier(), num_labels=2), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded, batch), _logits(module, batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_and_unmerge_are_exact_bias_included(family):
    model = IA3().apply(FAMILIES[family]())
    _perturb(model)
    batch = random_batch()
    ref = _logits(model, batch)
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    merge(model)
    assert all(layer.ia3["default"].merged for _, layer in ia3_layers(model))
    torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=1e-5)
    unmerge(model)
    for name, value in weights.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_a_zero_vector_cannot_be_merged_and_nothing_changes():
    model = IA3().apply(tiny_llama())
    with torch.no_grad():
        ia3_layers(model)[-1][1].ia3["default"].ia3_l[0] = 0.0
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="zeros or non-finite"):
        merge(model)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in before.items())


def test_two_adapters_multiply_their_vectors():
    model = tiny_llama()
    IA3(adapter_name="a").apply(model)
    IA3(adapter_name="b").apply(model)
    layer = dict(ia3_layers(model))["model.layers.0.self_attn.v_proj"]
    assert isinstance(layer, IA3Linear) and list(layer.ia3) == ["a", "b"]
    with torch.no_grad():
        layer.ia3["a"].ia3_l.fill_(2.0)
        layer.ia3["b"].ia3_l.fill_(3.0)
        layer.ia3["a"].active = layer.ia3["b"].active = True
        x = torch.randn(2, 64)
        torch.testing.assert_close(layer(x), 6 * layer.base_layer(x))


def test_arguments_follow_ia3config_and_fail_clearly():
    with pytest.raises(ValueError, match=r"feedforward_modules \['fc2'\] are not among target_modules"):
        IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["fc2"])
    with pytest.raises(ValueError, match="no default target_modules for model type 'gpt_bigcode'"):
        from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

        IA3().apply(GPTBigCodeForCausalLM(GPTBigCodeConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    with pytest.raises(ValueError, match="entry 'k_prj'.*did you mean 'k_proj'"):
        IA3(target_modules=["k_prj"], feedforward_modules=[]).apply(tiny_llama())
    regex = IA3(target_modules=r".*\.(k_proj|down_proj)", feedforward_modules=r".*\.down_proj").apply(
        tiny_llama()
    )
    assert {n.rsplit(".", 1)[-1] for n, _ in ia3_layers(regex)} == {"k_proj", "down_proj"}


def test_recipe_loads_and_runs_one_batch(tmp_path, monkeypatch, capsys):
    cli = fit_recipe("minilm-sentiment/ia3.yaml", tmp_path, monkeypatch, "--trainer.fast_dev_run=1")
    assert [m.name for m in lightning_peft.applied_methods(cli.model)] == ["ia3"]
    assert "method: ia3" in capsys.readouterr().out
    trained = dict(cli.model.named_parameters())
    assert any(not torch.all(p == 1) for n, p in trained.items() if n.endswith("ia3_l"))  # the vectors moved
