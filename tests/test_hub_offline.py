"""Hub ids wherever a model or adapter is read, offline, from a Hugging Face cache built here.

The cache has huggingface_hub's layout (``models--org--name/{blobs,refs/main,snapshots/<commit>}``,
snapshot files linking to content-addressed blobs), filled with a tiny BERT classifier, a
LoRA adapter for it in PEFT's format and a tiny Llama. A subprocess with
``HF_HUB_CACHE``/``HF_HOME`` pointing there and ``HF_HUB_OFFLINE=1`` (huggingface_hub reads
them at import) loads everything by hub id: ``SequenceClassifier``, ``CausalLM``,
``import_peft``, ``load_quantized`` and ``FourBitPrecision.load``. The results must equal
loading the same folders by path, and a hub id missing from the cache must fail in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_peft import CausalLM, SequenceClassifier, export_peft, import_peft
from lightning_peft.callbacks import LoRA
from lightning_peft.plugins import FourBitPrecision
from lightning_peft.quantization import load_quantized

from conftest import random_batch, tiny_bert_classifier, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Put ``folder``'s files into ``cache`` as huggingface_hub stores a downloaded snapshot of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


SCRIPT = """
import json
import torch
from lightning_peft import CausalLM, SequenceClassifier, import_peft
from lightning_peft.plugins import FourBitPrecision
from lightning_peft.quantization import load_quantized

batch = torch.load("batch.pt")
out = {}
with torch.no_grad():
    classifier = import_peft(SequenceClassifier("tiny-org/tiny-bert", num_labels=2), "tiny-org/tiny-bert-lora")
    out["classifier"] = classifier.eval()(**batch).logits
    out["names"] = [classifier.pooling, classifier.backbone.config.name_or_path, classifier.hparams.model]
    out["lm"] = CausalLM("tiny-org/tiny-llama").eval()(**batch).logits
    out["quantized"] = load_quantized("tiny-org/tiny-llama", dtype=torch.float32)(**batch).logits
    plugin = FourBitPrecision(compute_dtype=torch.float32)
    out["plugin"] = plugin.load("tiny-org/tiny-llama", dtype=torch.float32)(**batch).logits
torch.save(out, "out.pt")
errors = {}
for what, load in {
    "SequenceClassifier": lambda: SequenceClassifier("tiny-org/absent"),
    "CausalLM": lambda: CausalLM("tiny-org/absent"),
    "import_peft": lambda: import_peft(classifier, "tiny-org/absent"),
    "load_quantized": lambda: load_quantized("tiny-org/absent"),
    "FourBitPrecision.load": lambda: plugin.load("tiny-org/absent"),
}.items():
    try:
        load()
        errors[what] = None
    except Exception as err:
        errors[what] = [type(err).__name__, str(err)]
json.dump(errors, open("errors.json", "w"))
"""


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    tiny_bert_classifier().save_pretrained(tmp / "bert")
    tiny_llama().save_pretrained(tmp / "llama")
    adapted = SequenceClassifier(str(tmp / "bert"), num_labels=2)
    LoRA(r=4, target_modules=["query", "value"]).apply(adapted)
    with torch.no_grad():
        for param in adapted.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    export_peft(adapted, tmp / "adapter")
    # the base is a sentence-transformers checkpoint: mean pooling, found in the cache by hub id
    (tmp / "bert" / "modules.json").write_text(
        json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )
    (tmp / "bert" / "1_Pooling").mkdir()
    (tmp / "bert" / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    cache = tmp / "home" / "hub-cache"
    for repo_id, folder in (
        ("tiny-org/tiny-bert", "bert"),
        ("tiny-org/tiny-bert-lora", "adapter"),
        ("tiny-org/tiny-llama", "llama"),
    ):
        add_to_cache(cache, repo_id, tmp / folder)
    batch = random_batch()
    torch.save(batch, tmp / "batch.pt")
    (tmp / "script.py").write_text(textwrap.dedent(SCRIPT))
    env = {
        **os.environ,
        "HF_HOME": str(tmp / "home"),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "script.py"], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(tmp / "out.pt")
    errors = json.loads((tmp / "errors.json").read_text())
    return tmp, batch, out, errors, cache


def test_models_and_adapters_load_by_hub_id_from_the_cache_offline(offline_run):
    tmp, batch, out, _, _ = offline_run
    assert out["names"] == ["mean", "tiny-org/tiny-bert", "tiny-org/tiny-bert"], (
        "pooled as the cached checkpoint says"
    )
    with torch.no_grad():
        classifier = import_peft(SequenceClassifier(str(tmp / "bert"), num_labels=2), tmp / "adapter").eval()
        torch.testing.assert_close(out["classifier"], classifier(**batch).logits, rtol=0, atol=0)
        torch.testing.assert_close(
            out["lm"], CausalLM(str(tmp / "llama")).eval()(**batch).logits, rtol=0, atol=0
        )
        quantized = load_quantized(tmp / "llama", dtype=torch.float32)(**batch).logits
        plugin = FourBitPrecision(compute_dtype=torch.float32).load(tmp / "llama", dtype=torch.float32)
        from_plugin = plugin(**batch).logits
    torch.testing.assert_close(out["quantized"], quantized, rtol=0, atol=0)
    torch.testing.assert_close(out["plugin"], from_plugin, rtol=0, atol=0)


def test_a_hub_id_missing_from_the_cache_offline_fails_in_one_clear_line(offline_run):
    _, _, _, errors, cache = offline_run
    assert set(errors) == {
        "SequenceClassifier",
        "CausalLM",
        "import_peft",
        "load_quantized",
        "FourBitPrecision.load",
    }
    for what, error in errors.items():
        assert error is not None, f"{what} loaded a repository that is not in the cache"
        kind, message = error
        assert kind == "FileNotFoundError", (what, kind, message)
        assert "\n" not in message, (what, message)
        assert "'tiny-org/absent'" in message and "HF_HUB_OFFLINE=1" in message, (what, message)
        assert str(cache) in message and len(message) < 400, (what, message)
