"""``SequenceClassifier(pooling=...)``: what the head reads, the checkpoint's own convention by default.

``"mean"`` is the masked mean of the last hidden states over the user's tokens, ``"last"``
the last token the mask keeps, ``"cls"`` the model's own head input. Checked with every
registered method (prompt tuning's virtual tokens stay out of the mean), through
``load_from_checkpoint``, and against exports a plain Hugging Face class could not reproduce.
"""

from __future__ import annotations

import json

import lightning as L
import peft_runs
import pytest
import torch

import lightning_peft
from lightning_peft import SequenceClassifier
from lightning_peft import callbacks as cb
from lightning_peft.core.pooling import pool, pooling_of
from lightning_peft.hub import pooling_convention
from lightning_peft.methods.base import registry, trainable_named_parameters

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = sorted(registry())


def sentence_transformers_folder(tmp_path, mode: str | None = "pooling_mode_mean_tokens"):
    """The tiny BERT classifier's base saved as a sentence-transformers checkpoint pooling by ``mode``."""
    folder = tmp_path / f"st-{mode}"
    peft_runs.classifier().save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    modes = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_lasttoken")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({m: m == mode for m in modes}))
    return folder


def padded(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """``batch`` with ``extra`` more padding tokens (id 0, mask 0) on the right."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad = torch.zeros(ids.shape[0], extra, dtype=ids.dtype)
    return {"input_ids": torch.cat([ids, pad], 1), "attention_mask": torch.cat([mask, pad], 1)}


def batch(n: int = 3) -> dict[str, torch.Tensor]:
    samples = peft_runs.samples(n)
    out = {k: torch.stack([s[k] for s in samples]) for k in ("input_ids", "attention_mask")}
    out["attention_mask"][0, 6:] = 0  # a shorter first sentence
    out["input_ids"][0, 6:] = 0
    return out


def classifier(pooling: str | None = None, model=None) -> SequenceClassifier:
    return SequenceClassifier(model or peft_runs.classifier(), num_labels=2, lr=1e-2, pooling=pooling)


# --------------------------------------------------------------------------- the default rule
def test_the_default_follows_the_checkpoint_s_own_convention(tmp_path, minilm_path):
    assert pooling_convention("embedded:all-MiniLM-L6-v2") == "mean"  # the embedded MiniLM is one
    assert SequenceClassifier("embedded:all-MiniLM-L6-v2").pooling == "mean"
    assert SequenceClassifier(minilm_path).hparams.pooling == "mean"
    peft_runs.classifier().save_pretrained(tmp_path / "plain")
    assert classifier(model=str(tmp_path / "plain")).pooling == "cls"
    for mode, want in (
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_lasttoken", "last"),
        (None, "mean"),
    ):
        folder = sentence_transformers_folder(tmp_path, mode)
        assert pooling_convention(folder) == want
        assert classifier(model=str(folder)).pooling == want
        from transformers import AutoModelForSequenceClassification

        module = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
        assert classifier(model=module).pooling == want, "a module loaded from the folder too"
    assert classifier().pooling == "cls", "a module built from a config has no convention"
    assert classifier("mean", model=str(tmp_path / "plain")).pooling == "mean", "an explicit choice wins"
    with pytest.raises(ValueError, match=r"pooling must be one of \['cls', 'mean', 'last'\]"):
        classifier("max")


# --------------------------------------------------------------------------- what the head reads
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_the_head_reads_the_pooled_user_tokens(pooling):
    module = classifier(pooling).eval()
    assert pooling_of(module.backbone) == pooling
    assert module.backbone.bert.pooler is None, "BERT's [CLS] pooler is unused, so removed"
    x = batch()
    with torch.no_grad():
        hidden = module.backbone.bert(**x).last_hidden_state  # (B, T, H)
        mask = x["attention_mask"].float()
        if pooling == "mean":
            vector = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            vector = hidden[torch.arange(3), mask.sum(1).long() - 1]
        want = module.backbone.classifier(vector)
        torch.testing.assert_close(module(**x).logits, want)
        torch.testing.assert_close(
            module(**padded(x, 4)).logits, want, rtol=1e-5, atol=1e-5
        )  # padding: no change
    labels = torch.tensor([0, 1, 1])
    out = module(**x, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))


def test_pool_on_either_padding_side_and_without_a_mask():
    hidden = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(pool(hidden, None, "mean"), hidden.mean(1))
    torch.testing.assert_close(pool(hidden, None, "last"), hidden[:, -1])
    right, left = torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[0, 1, 1], [0, 0, 1]])
    torch.testing.assert_close(pool(hidden, right, "last"), torch.stack([hidden[0, 1], hidden[1, 0]]))
    torch.testing.assert_close(pool(hidden, left, "last"), hidden[:, 2])
    torch.testing.assert_close(pool(hidden, left, "mean"), torch.stack([hidden[0, 1:].mean(0), hidden[1, 2]]))


def test_models_with_layers_before_the_head_are_refused_for_mean_pooling():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(
        vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=32
    )
    with pytest.raises(ValueError, match=r"pre_classifier.*use pooling='cls'"):
        classifier("mean", model=DistilBertForSequenceClassification(cfg))


def test_a_decoder_classifier_pools_its_last_or_mean_token():
    from transformers import LlamaForSequenceClassification

    from conftest import tiny_llama_config

    config = tiny_llama_config()
    config.num_labels = 2
    torch.manual_seed(0)
    llama = LlamaForSequenceClassification(config)
    x = batch()
    x["input_ids"] = (x["input_ids"] % 100 + 3) * x["attention_mask"]  # padding: the pad id 0
    with torch.no_grad():
        own = classifier(model=llama).eval()(**x).logits  # HF's own rule: the last non-pad token
        last = classifier("last", model=llama).eval()
        torch.testing.assert_close(last(**x).logits, own, rtol=1e-5, atol=1e-5)
        assert classifier("mean", model=llama).eval()(**x).logits.shape == (3, 2)


# --------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", NAMES)
def test_every_method_trains_with_mean_pooling_over_the_user_tokens(name):
    cls = registry()[name]
    module = classifier("mean")
    torch.manual_seed(1)
    getattr(cb, cls.callback_name)(**cls.example).apply(module)
    x = batch()
    module.train()
    loss = module(**x, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    trainable = list(trainable_named_parameters(module))
    assert trainable and all(p.grad is not None for _, p in trainable), "every trainable tensor takes part"
    module.eval()
    with torch.no_grad():
        got = module(**x).logits
        # an independent computation: the base model's output (the methods' hooks cut any virtual
        # tokens from it), the user's mask, the head
        hidden = module.backbone.bert(**x).last_hidden_state  # (B, T, H)
        assert hidden.shape[1] == x["input_ids"].shape[1]
        mask = x["attention_mask"].float()[..., None]
        want = module.backbone.classifier((hidden * mask).sum(1) / mask.sum(1))
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(module(**padded(x, 3)).logits, got, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- checkpoints and exports
def test_load_from_checkpoint_keeps_the_pooling_and_refuses_another(tmp_path):
    folder = sentence_transformers_folder(tmp_path)
    module = SequenceClassifier(str(folder), num_labels=2, lr=1e-2)
    assert module.pooling == "mean"
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[cb.LoRA(r=2, target_modules="all-linear")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(peft_runs.samples(4), batch_size=2))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    x = batch()
    loaded = SequenceClassifier.load_from_checkpoint(tmp_path / "run.ckpt").eval()
    assert loaded.pooling == "mean"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, module.eval()(**x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"trained with pooling='mean'.*load it with pooling='mean'"):
        SequenceClassifier.load_from_checkpoint(tmp_path / "run.ckpt", pooling="cls")
    # a checkpoint written before pooling existed was trained on [CLS]
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=False)
    del checkpoint["hyper_parameters"]["pooling"], checkpoint["lightning_peft_pooling"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"trained with pooling='cls'"):
        SequenceClassifier.load_from_checkpoint(tmp_path / "old.ckpt")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_exports_a_plain_hugging_face_class_cannot_reproduce_are_refused_in_one_line(pooling, tmp_path):
    module = classifier(pooling)
    cb.LoRA(r=2, target_modules=["query"]).apply(module)
    for export in (lightning_peft.export_merged, lightning_peft.export_peft):
        with pytest.raises(ValueError, match=rf"pooling='{pooling}'.*save_delta") as info:
            export(module, tmp_path / "out")
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    lightning_peft.save_delta(module, tmp_path / "delta")  # the delta carries it: load into the same pooling
    again = classifier(pooling)
    lightning_peft.load_delta(again, tmp_path / "delta")
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**x).logits, module.eval()(**x).logits, rtol=0, atol=0)
