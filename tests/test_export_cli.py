"""``lightning-peft export``: which formats work for which method, one-line refusals, QLoRA merges.

Issue 12, items 4 and 5. The real command on a real run (tokenizer, labels, logits of a merged
export) is in ``test_cli_runs.py``; here the matrix runs in-process on small models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_peft import CausalLM, SequenceClassifier, TextClassificationData, export_merged
from lightning_peft.callbacks import Adapter, PrefixTuning, PromptTuning
from lightning_peft.cli import main
from lightning_peft.cli_export import working_formats
from lightning_peft.methods.base import registry

from conftest import fit_recipe, tiny_bert_classifier, tiny_llama

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
TEXTS = ["the battery lasts all day", "it broke in a week", "demanding, but the summit rewarded every step"]


def _docs_table() -> dict[str, dict[str, str]]:
    """The format table of docs/cli.md: ``{method: {format: "yes" | "no" | "causal LMs only"}}``."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1:] != ["delta", "peft", "merged"] and not cells[0].startswith("-"):
            rows[cells[0]] = dict(zip(["delta", "peft", "merged"], cells[1:]))
    return rows


def _method(name: str):
    methods = registry()
    if name in ("dora", "rslora"):
        return methods["lora"](**{**methods["lora"].example, f"use_{name}": True})
    if name == "partial":
        return methods["partial"](parts=["layernorm"])
    return methods[name](**methods[name].example)


@pytest.mark.parametrize(
    "name", ["full", "partial", "lora", "dora", "rslora", "ia3", "adapter", "prefix", "prompt"]
)
def test_docs_format_table_matches_the_methods(name):
    expected = _docs_table()[name]
    encoder = SequenceClassifier(tiny_bert_classifier())
    decoder = CausalLM(tiny_llama())
    _method(name).apply(encoder)
    _method(name).apply(decoder)
    found = {"encoder": working_formats(encoder), "decoder": working_formats(decoder)}
    for fmt, says in expected.items():
        want = {"yes": (True, True), "no": (False, False), "causal LMs only": (False, True)}[says]
        assert (fmt in found["encoder"], fmt in found["decoder"]) == want, (name, fmt, found)


# --------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert_classifier().save_pretrained(folder)
    return str(folder)


def _checkpoint(base: str, callback, folder: Path) -> Path:
    module = SequenceClassifier(base)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    path = folder / f"{callback.name}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    ("method", "fmt"),
    [
        ("adapter", "merged"),
        ("adapter", "peft"),
        ("prefix", "merged"),
        ("prefix", "peft"),
        ("prompt", "merged"),
        ("prompt", "peft"),
    ],
)
def test_an_export_that_cannot_be_made_is_one_line(method, fmt, tiny_base, tmp_path, capsys):
    callback = {
        "adapter": lambda: Adapter(bottleneck=8),
        "prefix": lambda: PrefixTuning(num_virtual_tokens=4),
        "prompt": lambda: PromptTuning(num_virtual_tokens=4),
    }[method]()
    ckpt = _checkpoint(tiny_base, callback, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["export", "--ckpt", str(ckpt), "--format", fmt, "--out", str(tmp_path / "out"),
              "--model-class", "lightning_peft.SequenceClassifier"])  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(
        f"lightning-peft export: error: cannot write {ckpt.name} ({method}) as {fmt}: "
    )
    assert lines[0].endswith("formats that work for it: delta"), lines[0]
    assert "Traceback" not in err and "export_merged" not in err and "export_peft" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    main(["export", "--ckpt", str(ckpt), "--format", "delta", "--out", str(tmp_path / "delta"),
          "--model-class", "lightning_peft.SequenceClassifier"])  # fmt: skip
    assert (tmp_path / "delta" / "manifest.json").is_file()


# --------------------------------------------------------------------------- QLoRA
def test_qlora_checkpoint_merges_onto_its_4bit_base(tmp_path, monkeypatch, capsys):
    built = fit_recipe(
        "minilm-sentiment/qlora.yaml",
        tmp_path,
        monkeypatch,
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=1",
        "--data.init_args.batch_size=8",
        "--model.init_args.lr=0.05",  # deltas large enough to see
        "--model.init_args.pooling=cls",  # what a plain AutoModelForSequenceClassification reads
    )
    ckpt = built.trainer.checkpoint_callback.last_model_path
    assert torch.load(ckpt, weights_only=True)["FourBitPrecision"]["quant_type"] == "nf4"
    trained = built.model.eval()  # the 4-bit model the run trained
    tok = AutoTokenizer.from_pretrained(built.datamodule.tokenizer.name_or_path)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        want = trained(**batch).logits

    capsys.readouterr()
    main(["export", "--ckpt", ckpt, "--format", "merged", "--out", str(tmp_path / "merged")])
    assert "folded onto the dequantized nf4 base" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # the same deltas folded onto the full-precision original compute something else
    plain = SequenceClassifier.load_from_checkpoint(ckpt)
    export_merged(plain, tmp_path / "plain")
    other = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        off = (other(**batch).logits - want).abs().max()
    assert off > 20 * (got - want).abs().max() and off > 1e-3


def test_export_reports_a_checkpoint_it_cannot_load(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as info:
        main(["export", "--ckpt", str(bad), "--format", "delta", "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"is not a readable checkpoint", err) and "Traceback" not in err


# --------------------------------------------------------------------------- labels and tokenizer
def test_label_names_and_tokenizer_travel_with_the_module(minilm_path, tmp_path):
    module = SequenceClassifier(minilm_path, label_names=["negative", "positive"], pooling="cls")
    assert module.backbone.config.id2label == {0: "negative", 1: "positive"}
    assert len(module.tokenizer) > 30000  # by default the model's own
    export_merged(module, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert AutoTokenizer.from_pretrained(tmp_path / "m").vocab_size == module.tokenizer.vocab_size
    with pytest.raises(ValueError, match="label_names must be 2 distinct names"):
        SequenceClassifier(minilm_path, label_names=["negative", "neutral", "positive"])


def test_a_folder_without_a_tokenizer_is_not_read_as_one(tiny_base, tmp_path):
    module = SequenceClassifier(tiny_base)
    assert module.tokenizer is None  # transformers would build a 5-token one from config.json alone
    with pytest.warns(UserWarning, match="no tokenizer is saved"):
        export_merged(module, tmp_path / "m")
    with pytest.raises(OSError, match="holds no tokenizer"):
        _ = SequenceClassifier(tiny_base, tokenizer=tiny_base).tokenizer
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine", "label": 1}\n')
    data = TextClassificationData(tiny_base, str(rows), str(rows))
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        data.setup("fit")


def test_data_label_names_fix_the_number_of_labels(tmp_path, minilm_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine", "label": 1}\n{"text": "meh", "label": 2}\n')
    data = TextClassificationData(minilm_path, str(rows), str(rows), label_names=["neg", "pos"])
    assert data.num_labels == 2 and data.label_names == ["neg", "pos"]
    with pytest.raises(ValueError, match="outside the allowed range"):
        data.setup("fit")
    with pytest.raises(ValueError, match="names 2 labels but num_labels=3"):
        TextClassificationData(minilm_path, str(rows), str(rows), label_names=["neg", "pos"], num_labels=3)
