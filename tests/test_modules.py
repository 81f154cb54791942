"""CausalLM and SequenceClassifier: loading, freezing, optimizer, metrics, errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.callbacks import PartialFinetuning
from lightning_peft.methods.base import trainable_parameter_names

from conftest import minilm_batches, random_batch, tiny_llama


def _trainer(steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def test_minilm_head_only_trains_exactly_the_head(minilm_path):
    module = SequenceClassifier(minilm_path, num_labels=2, lr=5e-2)
    assert module.backbone.training, "a loaded backbone must train with dropout like any new module"
    assert all(not p.requires_grad for n, p in module.named_parameters() if "classifier" not in n)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(4)
    batches = minilm_batches(minilm_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    head = {"backbone.classifier.weight", "backbone.classifier.bias"}
    assert {n for n, p in module.named_parameters() if p.requires_grad} == head
    assert set(trainable_parameter_names(module)) == head
    optimized = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert {id(p) for p in optimized} == {id(p) for n, p in module.named_parameters() if n in head}
    assert len(optimized) == 2
    after = module.state_dict()
    for name in before:
        if name in head:
            assert not torch.equal(after[name], before[name]), f"{name} did not move"
        else:
            assert torch.equal(after[name], before[name]), f"frozen {name} changed"


def test_classifier_logs_val_metrics(minilm_path):
    module = SequenceClassifier("embedded:all-MiniLM-L6-v2", num_labels=2)
    batches = minilm_batches(minilm_path, n=2)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    metrics = _trainer(1).validate(module, dataloaders=loader, verbose=False)[0]
    assert {"val_loss", "val_acc", "val_f1"} <= set(metrics)
    assert 0.0 <= metrics["val_acc"] <= 1.0


def test_causal_lm_val_ppl_is_exp_of_token_weighted_loss():
    module = CausalLM(tiny_llama())
    batches = [random_batch(labels="lm", seed=i) for i in range(2)]
    metrics = _trainer(1).validate(
        module, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), verbose=False
    )[0]
    with torch.no_grad():
        losses = [module(**b).loss for b in batches]
    expected = torch.stack(losses).mean()  # same token count per batch
    assert metrics["val_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(float(torch.exp(expected)), rel=1e-4)


def test_causal_lm_test_loss_equals_val_loss_on_the_same_batches():
    module = CausalLM(tiny_llama())
    loader = torch.utils.data.DataLoader(
        [random_batch(labels="lm", seed=i) for i in range(2)], batch_size=None
    )
    val = _trainer(1).validate(module, dataloaders=loader, verbose=False)[0]
    test = _trainer(1).test(module, dataloaders=loader, verbose=False)[0]
    assert test["test_loss"] == pytest.approx(val["val_loss"], rel=1e-6)
    assert test["test_ppl"] == pytest.approx(val["val_ppl"], rel=1e-6)


def test_causal_lm_predict_scores_each_example_by_its_labelled_tokens():
    module = CausalLM(tiny_llama())
    batch = random_batch(labels="lm", seed=3)  # (2, T)
    batch["labels"][0, :4] = -100  # example 0: loss on its tail only
    batch["labels"][1, :] = -100  # example 1: nothing labelled
    scores = _trainer(1).predict(module, dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))[0]
    assert scores.shape == (2,)
    with torch.no_grad():
        alone = module(**{k: v[:1] for k, v in batch.items()}).loss
    assert float(scores[0]) == pytest.approx(float(alone), rel=1e-5)
    assert torch.isnan(scores[1])


def test_schedule_warmup_then_cosine():
    module = CausalLM(tiny_llama(), lr=1e-2, warmup_steps=2, schedule="cosine")
    trainer = _trainer(6, callbacks=[PartialFinetuning(parts=["head"])])
    lrs = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer.callbacks.append(Spy())
    batches = [random_batch(labels="lm", seed=i) for i in range(6)]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-2)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5]


def test_generate_runs():
    module = CausalLM(tiny_llama())
    out = module.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_missing_model_path_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SequenceClassifier(str(tmp_path / "nope"), num_labels=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CausalLM("./models/not-here")


def test_label_outside_num_labels_is_named(minilm_path):
    module = SequenceClassifier(minilm_path, num_labels=2)
    batch = minilm_batches(minilm_path, n=1)[0]
    batch["labels"] = torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"label 2 is outside 0\.\.1"):
        module.training_step(batch, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0}, "lr must be positive"),
        ({"schedule": "step"}, "schedule must be"),
        ({"num_labels": 1}, "num_labels"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    from conftest import tiny_bert_classifier

    with pytest.raises(ValueError, match=message):
        SequenceClassifier(tiny_bert_classifier(), **{"num_labels": 2, **kwargs})


def test_hparams_allow_rebuild_from_checkpoint(tmp_path, minilm_path):
    module = SequenceClassifier(minilm_path, num_labels=2, lr=3e-3)
    assert module.hparams.model == minilm_path and module.hparams.lr == 3e-3
