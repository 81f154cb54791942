"""Two tasks on one encoder: an adapter and a head each, trained together, served in one mixed batch."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from transformers import BertConfig, BertModel

import lightning_peft as lp
from lightning_peft import MultiTaskClassifier, MultiTaskData
from lightning_peft.callbacks import LoRA
from lightning_peft.persistence import delta_state_dict

from conftest import fit_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS = [
    ("the battery lasts all day", 1, "tech"),
    ("screen cracked in a week", 0, "tech"),
    ("the soup tasted like home", 1, "food"),
    ("cold fries and a long wait", 0, "food"),
    ("fast charging, bright screen", 1, "tech"),
    ("stale bread, rude staff", 0, "food"),
] * 3


def _encoder(vocab: int) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertModel(config)


@pytest.fixture
def data(tmp_path, minilm_path):
    for split in ("train", "val"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for text, label, domain in ROWS:
                f.write(json.dumps({"text": text, "label": label, "domain": domain}) + "\n")
    tasks = {
        "sentiment": {"label_field": "label"},
        "domain": {"label_field": "domain", "label_names": ["tech", "food"]},
    }
    return MultiTaskData(minilm_path, tasks, "train.jsonl", "val.jsonl", batch_size=4, root=str(tmp_path))


def _module(vocab: int) -> MultiTaskClassifier:
    return MultiTaskClassifier(_encoder(vocab), {"sentiment": 2, "domain": 2}, lr=1e-2,
                               label_names={"domain": ["tech", "food"]})  # fmt: skip


def _trainer(steps: int, callbacks) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)  # fmt: skip


def test_two_tasks_train_together_each_through_its_own_adapter_and_head(data, tmp_path):
    module = _module(data.tokenizer.vocab_size)
    callbacks = [
        LoRA(r=2, target_modules=["query", "value"], adapter_name=t) for t in ("sentiment", "domain")
    ]
    start = {}
    for callback in callbacks:
        callback.apply(module)
    start = {k: v.clone() for k, v in delta_state_dict(module).items()}
    _trainer(3, callbacks).fit(module, datamodule=data)
    after = delta_state_dict(module)
    for task in ("sentiment", "domain"):
        moved = [
            k
            for k in after
            if (f".{task}." in k or k.startswith(f"heads.{task}.")) and not torch.equal(after[k], start[k])
        ]
        assert any(k.startswith(f"heads.{task}.") for k in moved) and any(".lora." in k for k in moved), task
    batch = data.collate(data.split("val")["sentiment"][:4])
    tasks = ["domain", "sentiment", "sentiment", "domain"]
    served = module.classify(batch, tasks)
    module.eval()
    for row, task in enumerate(tasks):
        alone = module(task, **{k: v[row : row + 1] for k, v in batch.items()})
        assert served[row][:2] == (task, int(alone.argmax(-1)))
    assert served[0][2] in ("tech", "food")
    lp.save_delta(module, tmp_path / "domain", adapter_name="domain")
    fresh = _module(data.tokenizer.vocab_size)
    lp.load_delta(fresh, tmp_path / "domain")
    fresh.eval()
    torch.testing.assert_close(fresh("domain", **batch), module("domain", **batch), rtol=0, atol=0)


def test_a_task_without_its_adapter_is_refused(data):
    module = _module(data.tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"tasks \['domain'\] have no adapter.*adapter_name='domain'"):
        _trainer(1, [LoRA(r=2, adapter_name="sentiment")]).fit(module, datamodule=data)


def test_multitask_recipes_load_and_run_one_batch(tmp_path, monkeypatch):
    cli = fit_recipe("minilm-multitask/both.yaml", tmp_path, monkeypatch, "--trainer.fast_dev_run=1")
    assert lp.adapter_names(cli.model) == ["sentiment", "domain"]
    assert cli.trainer.callback_metrics["val_acc_domain"] >= 0


def test_a_checkpoint_restores_every_task_without_a_trainer_and_all_linear_leaves_the_heads_alone(
    data, tmp_path
):
    from lightning.pytorch.callbacks import ModelCheckpoint

    vocab = data.tokenizer.vocab_size
    module = _module(vocab)
    assert module.backbone.pooler is None, "the pooler reads nothing either pooling uses"
    callbacks = [LoRA(r=2, target_modules="all-linear", adapter_name=t) for t in ("sentiment", "domain")]
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[*callbacks, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])  # fmt: skip
    trainer.fit(module, datamodule=data)
    keys = list(delta_state_dict(module))
    assert any(".lora." in k for k in keys)
    assert not [k for k in keys if k.startswith("heads.") and ".lora." in k], "a head that trains is not adapted"
    stored = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert not [k for k in stored if ".lora." not in k and not k.startswith("heads.")], "delta only"
    loaded = MultiTaskClassifier.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", model=_encoder(vocab))
    assert lp.adapter_names(loaded) == ["sentiment", "domain"]
    module.eval(), loaded.eval()
    batch = data.collate(data.split("val")["sentiment"][:4])
    batch.pop("labels")
    for task in ("sentiment", "domain"):
        torch.testing.assert_close(loaded(task, **batch), module(task, **batch), rtol=0, atol=0)
    assert loaded.classify(batch, ["domain", "sentiment"] * 2) == module.classify(batch, ["domain", "sentiment"] * 2)
