"""The real ``lightning-peft`` command, run as a user runs it, in a temporary folder.

One short ``fit`` of the shipped LoRA recipe with LightningCLI's own ``--optimizer`` flag and
the recipe's wandb logger (offline), then ``validate`` and ``export`` from the best checkpoint
it printed (issue 12, items 1, 3, 4 and 11).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_peft import SequenceClassifier

from conftest import RECIPES

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "the battery lasts all day",
    "the soup tasted like home",
    "it broke in a week and support never answered",
    "demanding, but the summit rewarded every step",
]


def lightning_peft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the ``lightning-peft`` entry point (``lightning_peft.cli:main``) in a fresh process."""
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "lightning_peft.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``fit`` with ``--optimizer torch.optim.SGD``: 4 steps, validated every 2, wandb offline."""
    folder = tmp_path_factory.mktemp("user")
    done = lightning_peft(
        "fit",
        "--config",
        str(RECIPES / "minilm-sentiment" / "lora.yaml"),
        "--optimizer",
        "torch.optim.SGD",
        "--optimizer.lr",
        "0.5",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2",
        "--data.init_args.batch_size=8",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.pooling=cls",  # what plain transformers reads: merged and PEFT exports work
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    best = re.search(r"^best checkpoint \(val_acc ([0-9.]+)\): (\S+)$", done.stdout, re.M)
    assert best, done.stdout
    return {"folder": folder, "out": done.stdout, "err": done.stderr, "best": best, "ckpt": folder / best[2]}


def test_optimizer_flag_trains_lora(run):
    trainable = re.search(r"trainable params: ([0-9,]+)", run["out"])[1]
    assert f"optimizer: torch.optim.sgd.SGD | params: {trainable} in 2 group(s), lr 0.5" in run["out"]
    assert "will be overridden" not in run["err"]  # LightningCLI did not build it from model.parameters()
    checkpoint = torch.load(run["ckpt"], weights_only=True)
    lora_b = {k: v for k, v in checkpoint["state_dict"].items() if "lora_b" in k}
    assert len(lora_b) == 37 and all(v.abs().max() > 0 for v in lora_b.values())
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == len(checkpoint["state_dict"])
    assert {g["initial_lr"] for g in groups} == {0.5}


def test_fit_ends_with_the_best_checkpoint_and_where_the_files_are(run):
    folder, out = run["folder"], run["out"]
    assert run["ckpt"].is_file()
    states = torch.load(run["ckpt"], weights_only=True)["callbacks"]
    (state,) = [s for k, s in states.items() if k.startswith("ModelCheckpoint")]
    assert float(run["best"][1]) == pytest.approx(float(state["best_model_score"]), abs=1e-4)
    last = re.search(r"^last checkpoint \(val_acc [0-9.]+\): (\S+)$", out, re.M)
    assert last and (folder / last[1]).name == "last.ckpt" and (folder / last[1]).is_file()
    run_dir = re.search(r"^run folder \(config\.yaml, checkpoints/\): (\S+)$", out, re.M)[1]
    assert (folder / run_dir / "config.yaml").is_file()
    assert run["ckpt"].parent == folder / run_dir / "checkpoints"
    assert not (folder / "runs" / "config.yaml").exists()  # no config shared by every run
    wandb_dir = re.search(r"^wandb run: (\S+)$", out, re.M)[1]
    assert (folder / wandb_dir).is_dir() and wandb_dir.endswith(Path(run_dir).name)
    assert out.index("last validation metrics") < out.index("best checkpoint")


def test_fit_output_is_quiet(run):
    err = run["err"]
    for noise in ("💡 Tip", "anonymous setting", "git root", "will be overridden by"):
        assert noise not in err, noise


def test_validate_from_the_best_checkpoint_logs_nothing_new(run):
    folder = run["folder"]
    before = sorted(p.relative_to(folder) for p in folder.rglob("*") if "wandb" not in p.parts)
    wandb_runs = sorted((folder / "runs" / "wandb").glob("*run-*"))
    done = lightning_peft(
        "validate",
        "--config",
        str(RECIPES / "minilm-sentiment" / "lora.yaml"),
        "--ckpt_path",
        str(run["ckpt"].relative_to(folder)),
        "--trainer.limit_val_batches=2",
        "--data.init_args.batch_size=8",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.pooling=cls",
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val_acc" in done.stdout
    for noise in ("LOAD REPORT", "MISSING", "The dirpath has changed", "Be aware that when using"):
        assert noise not in done.stderr, noise
    assert sorted((folder / "runs" / "wandb").glob("*run-*")) == wandb_runs  # no new wandb run
    after = sorted(p.relative_to(folder) for p in folder.rglob("*") if "wandb" not in p.parts)
    assert after == before  # no checkpoint folder, no config.yaml


def test_merged_export_is_a_complete_hugging_face_folder(run, tmp_path):
    done = lightning_peft(
        "export",
        "--ckpt",
        str(run["ckpt"]),
        "--format",
        "merged",
        "--out",
        str(tmp_path / "m"),
        cwd=run["folder"],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOAD REPORT" not in done.stderr and "MISSING" not in done.stderr
    assert "tokenizer: saved; labels: negative, positive" in done.stdout

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert len(tok) > 30000  # MiniLM's own vocabulary, not an empty one
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    trained = SequenceClassifier.load_from_checkpoint(run["ckpt"]).eval()
    assert trained.hparams.label_names == ["negative", "positive"]
    assert trained.hparams.tokenizer == "embedded:all-MiniLM-L6-v2"
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, trained(**batch).logits, atol=1e-5, rtol=1e-5)


def test_peft_export_names_the_hub_id(run, tmp_path):
    done = lightning_peft(
        "export",
        "--ckpt",
        str(run["ckpt"]),
        "--format",
        "peft",
        "--out",
        str(tmp_path / "p"),
        cwd=run["folder"],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_an_export_that_cannot_be_made_is_one_line(tmp_path):
    """An adapter checkpoint asked for a merged model: one line on stderr, exit code 2."""
    script = tmp_path / "make.py"
    script.write_text(
        "import torch, lightning as L\n"
        "from lightning_peft import SequenceClassifier\n"
        "from lightning_peft.callbacks import Adapter\n"
        "m = SequenceClassifier('embedded:all-MiniLM-L6-v2', pooling='cls')\n"
        "ids = torch.randint(1000, 2000, (2, 8))\n"
        "b = {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': torch.tensor([0, 1])}\n"
        "t = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,\n"
        "              enable_model_summary=False, callbacks=[Adapter(bottleneck=8)])\n"
        "t.fit(m, train_dataloaders=torch.utils.data.DataLoader([b], batch_size=None))\n"
        "t.save_checkpoint('adapter.ckpt')\n"
    )
    made = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert made.returncode == 0, made.stderr[-3000:]
    done = lightning_peft(
        "export", "--ckpt", "adapter.ckpt", "--format", "merged", "--out", "out",
        "--model-class", "lightning_peft.SequenceClassifier", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    # bitsandbytes' own import notice on CPUs with AVX512-BF16 ("pip install kernels") aside
    lines = [line for line in done.stderr.splitlines() if line.strip() and "kernels-community" not in line]
    assert lines == [
        "lightning-peft export: error: cannot write adapter.ckpt (adapter) as merged: Adapter (adapter "
        "'default') cannot be folded into a plain model; formats that work for it: delta"
    ], done.stderr


def test_runs_folder_is_ignored_by_git():
    assert "runs/" in (ROOT / ".gitignore").read_text().split()
