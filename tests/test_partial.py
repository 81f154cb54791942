"""Partial and full fine-tuning: exactly the named parts train, nothing else moves."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.callbacks import FullFinetuning, PartialFinetuning
from lightning_peft.methods.base import count_parameters, trainable_parameter_names

from conftest import random_batch, tiny_bert_classifier, tiny_gpt2, tiny_llama


def _names(model: nn.Module) -> set[str]:
    return set(trainable_parameter_names(model))


def test_head_parts_per_family():
    assert _names(PartialFinetuning(parts=["head"]).apply(tiny_llama())) == {"lm_head.weight"}
    # GPT-2 ties lm_head to wte: the one shared tensor trains, listed once.
    gpt2 = PartialFinetuning(parts=["head"]).apply(tiny_gpt2())
    assert len(_names(gpt2)) == 1 and gpt2.lm_head.weight.requires_grad
    assert _names(PartialFinetuning(parts=["head"]).apply(tiny_bert_classifier())) == {
        "classifier.weight",
        "classifier.bias",
    }


def test_bias_layernorm_embeddings_select_by_type():
    bert = PartialFinetuning(parts=["bias"]).apply(tiny_bert_classifier())
    names = _names(bert)
    assert names and all(n.endswith(".bias") for n in names)
    assert names == {n for n, _ in bert.named_parameters() if n.endswith("bias")}

    llama = PartialFinetuning(parts=["layernorm"]).apply(tiny_llama())
    assert _names(llama) == {n for n, _ in llama.named_parameters() if "norm" in n}

    gpt2 = PartialFinetuning(parts=["embeddings"]).apply(tiny_gpt2())
    assert _names(gpt2) == {"transformer.wte.weight", "transformer.wpe.weight"}
    bert = PartialFinetuning(parts=["embeddings"]).apply(tiny_bert_classifier())
    assert _names(bert) == {
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
    }


def test_last_n_layers_and_combination():
    model = PartialFinetuning(parts=["head"], last_n_layers=1).apply(tiny_llama(num_layers=3))
    names = _names(model)
    assert "lm_head.weight" in names
    assert all(n.startswith("model.layers.2.") for n in names - {"lm_head.weight"})
    assert {n for n in names if n.startswith("model.layers.2.")} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.2.")
    }
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in names)


def test_full_trains_everything():
    model = FullFinetuning().apply(tiny_gpt2())
    trainable, total = count_parameters(model)
    assert trainable == total > 0
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parts": ["heads"]}, "unknown part"),
        ({"parts": ["head"], "last_n_layers": 0}, "positive integer"),
        ({}, "needs parts"),
    ],
)
def test_bad_config_fails_fast(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PartialFinetuning(**kwargs)


def test_last_n_layers_above_block_count_names_the_count():
    with pytest.raises(ValueError, match="only 2 transformer blocks"):
        PartialFinetuning(last_n_layers=3).apply(tiny_llama(num_layers=2))


def test_bias_on_a_model_without_biases_is_an_error():
    with pytest.raises(ValueError, match="no bias parameters"):
        PartialFinetuning(parts=["bias"]).apply(tiny_llama())


def test_reapplying_same_method_is_a_noop_and_other_config_an_error():
    model = tiny_llama()
    PartialFinetuning(parts=["head"]).apply(model)
    PartialFinetuning(parts=["head"]).apply(model)
    assert _names(model) == {"lm_head.weight"}
    with pytest.raises(ValueError, match="is already on this model"):
        PartialFinetuning(parts=["bias"]).apply(model)


def _fit(module: L.LightningModule, callbacks, data, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=data)
    return trainer


def _loader(labels: str, n: int = 6):
    batches = [random_batch(labels=labels, seed=i) for i in range(n)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


@pytest.mark.parametrize("parts", [["bias"], ["layernorm"], ["embeddings"]])
def test_classifier_trains_exactly_named_parts_plus_head(parts):
    module = SequenceClassifier(tiny_bert_classifier(), num_labels=2, lr=1e-2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _fit(module, [PartialFinetuning(parts=parts)], _loader("cls"))
    declared = _names(module)
    assert {"backbone.classifier.weight", "backbone.classifier.bias"} <= declared
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in module.named_parameters() if n in declared}
    for name, value in module.state_dict().items():
        if name in declared:
            continue
        assert torch.equal(value, before[name]), f"{name} changed but is frozen"
    assert any(not torch.equal(module.state_dict()[n], before[n]) for n in declared)


def test_last_n_layers_on_causal_lm():
    module = CausalLM(tiny_llama(num_layers=3), lr=1e-2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _fit(module, [PartialFinetuning(last_n_layers=2)], _loader("lm"))
    for name, value in module.state_dict().items():
        moved = not torch.equal(value, before[name])
        in_last_two = name.startswith(("backbone.model.layers.1.", "backbone.model.layers.2."))
        assert not moved or in_last_two, name
    assert any(not torch.equal(module.state_dict()[n], before[n]) for n in before if "layers.2." in n)


class UserModule(L.LightningModule):
    """A user's own module that builds its network in configure_model."""

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


def test_callback_on_user_module_built_in_configure_model():
    module = UserModule()
    trainer = _fit(module, [PartialFinetuning(parts=["head"])], _loader("lm"), steps=2)
    assert _names(module) == {"net.lm_head.weight"}
    assert [p for g in trainer.optimizers[0].param_groups for p in g["params"]] == [module.net.lm_head.weight]


def test_no_method_means_clear_error():
    module = CausalLM(tiny_llama())
    with pytest.raises(ValueError, match="no trainable parameters"):
        _fit(module, [], _loader("lm"), steps=1)
