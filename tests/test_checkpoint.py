"""Delta-only Lightning checkpoints: contents, size, exact resume, rebuilds without a Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft
from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.callbacks import LoRA, PartialFinetuning
from lightning_peft.checkpointing import META_KEY
from lightning_peft.methods.base import applied_methods, trainable_named_parameters
from lightning_peft.methods.lora import LoRAConfig
from lightning_peft.persistence import (
    IGNORE_FINGERPRINT_ENV,
    DeltaError,
    FingerprintMismatchError,
    delta_state_dict,
    fingerprint,
)

from conftest import random_batch, tiny_bert_classifier, tiny_llama

TESTS = Path(__file__).parent


def _trainer(steps: int, callbacks: list, **kw) -> L.Trainer:
    kw.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kw,
    )


def _loader(labels: str = "lm", n: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        [random_batch(labels=labels, seed=i) for i in range(n)], batch_size=None
    )


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects needed


def _module(seed: int = 0) -> CausalLM:
    return CausalLM(tiny_llama(seed=seed), lr=1e-2, warmup_steps=2, schedule="linear")


def _logits(model, seed: int = 5) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**random_batch(seed=seed)).logits


# --------------------------------------------------------------------------- one 8-step run
@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Eight LoRA steps with a checkpoint every 4 steps (all kept)."""
    folder = tmp_path_factory.mktemp("run")
    module = _module()
    saver = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    trainer = _trainer(8, [LoRA(r=4), saver])
    trainer.fit(module, _loader())
    return module, trainer, folder


def test_lora_checkpoint_holds_exactly_the_trainable_tensors(straight_run):
    module, trainer, folder = straight_run
    path = folder / "step=4.ckpt"
    ckpt = _load(path)
    names = [n for n, _ in trainable_named_parameters(module)]
    assert list(ckpt["state_dict"]) == names and len(names) == 2 * 7 * 2  # 2 blocks x 7 layers x (A, B)
    meta = ckpt[META_KEY]
    assert meta["adapters"] == [m.to_dict() for m in applied_methods(module)]
    assert meta["fingerprint"] == fingerprint(module)
    assert meta["versions"]["lightning_peft"] == lightning_peft.__version__
    trainable = sum(p.numel() for _, p in trainable_named_parameters(module))
    size = path.stat().st_size
    assert size <= 12 * trainable + 256 * 1024, (size, trainable)  # weights + AdamW's two moments
    assert ckpt["global_step"] == 4 and len(ckpt["optimizer_states"][0]["state"]) == len(names)


_RESUME = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import torch
    from safetensors.torch import save_file
    from test_checkpoint import _loader, _module, _trainer
    from lightning_peft.callbacks import LoRA
    from lightning_peft.persistence import delta_state_dict
    from lightning_peft.persistence import fingerprint

    module = _module()
    trainer = _trainer(8, [LoRA(r=4)])
    trainer.fit(module, _loader(), ckpt_path=sys.argv[1])
    save_file({{k: v.contiguous() for k, v in delta_state_dict(module).items()}}, sys.argv[2] + ".safetensors")
    opt = trainer.optimizers[0]
    info = {{
        "global_step": trainer.global_step,
        "adam_steps": sorted({{float(s["step"]) for s in opt.state.values()}}),
        "lr": trainer.lr_scheduler_configs[0].scheduler.get_last_lr(),
        "digest": fingerprint(module)["digest"],
    }}
    with open(sys.argv[2] + ".json", "w") as f:
        json.dump(info, f)
    """
)


@pytest.mark.slow
def test_resume_in_a_fresh_process_matches_straight_training(straight_run, tmp_path):
    module, trainer, folder = straight_run
    script = tmp_path / "resume.py"
    script.write_text(_RESUME.format(tests=str(TESTS)))
    out = tmp_path / "resumed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(TESTS)}
    done = subprocess.run(
        [sys.executable, str(script), str(folder / "step=4.ckpt"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    resumed = load_file(str(out) + ".safetensors")
    straight = delta_state_dict(module)
    assert list(resumed) and set(resumed) == set(straight)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
    info = json.loads(Path(str(out) + ".json").read_text())
    assert info["global_step"] == trainer.global_step == 8
    assert info["adam_steps"] == [8.0]
    assert info["lr"] == pytest.approx(trainer.lr_scheduler_configs[0].scheduler.get_last_lr(), abs=0)
    assert info["digest"] == fingerprint(module)["digest"]  # fingerprints agree across processes
    # 4 more steps did move the weights (the comparison above is not vacuous)
    at4 = _load(folder / "step=4.ckpt")["state_dict"]
    assert any(not torch.equal(at4[n], v) for n, v in straight.items())


def test_top_k_and_last_checkpoints_are_delta_only_and_resume(tmp_path):
    def saver() -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=tmp_path, monitor="train_loss", save_top_k=2, save_last=True, every_n_train_steps=1
        )

    module = _module()
    _trainer(4, [LoRA(r=4), saver()]).fit(module, _loader())
    files = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert len(files) == 3 and "last.ckpt" in files
    names = [n for n, _ in trainable_named_parameters(module)]
    for name in files:
        assert list(_load(tmp_path / name)["state_dict"]) == names
    again = _module()
    trainer = _trainer(6, [LoRA(r=4), saver()])
    trainer.fit(again, _loader(), ckpt_path="last")
    assert trainer.global_step == 6


def test_resuming_onto_another_base_names_the_difference(straight_run, monkeypatch):
    _, _, folder = straight_run
    with pytest.raises(FingerprintMismatchError, match=r"q_proj\.base_layer\.weight: values differ"):
        _trainer(8, [LoRA(r=4)]).fit(_module(seed=1), _loader(), ckpt_path=folder / "step=4.ckpt")
    monkeypatch.setenv(IGNORE_FINGERPRINT_ENV, "1")
    trainer = _trainer(5, [LoRA(r=4)])
    with pytest.warns(UserWarning, match="base model differs"):
        trainer.fit(_module(seed=1), _loader(), ckpt_path=folder / "step=4.ckpt")
    assert trainer.global_step == 5


def test_resuming_with_another_method_config_is_refused(straight_run):
    _, _, folder = straight_run
    with pytest.raises(DeltaError, match="already carries"):
        _trainer(8, [LoRA(r=2)]).fit(_module(), _loader(), ckpt_path=folder / "step=4.ckpt")


def test_qlora_checkpoint_resumes_onto_the_full_precision_base_before_quantization(tmp_path):
    from lightning_peft.plugins import FourBitPrecision

    def qlora(steps: int) -> L.Trainer:
        return _trainer(steps, [LoRA(r=4)], plugins=[FourBitPrecision("nf4", compute_dtype=torch.float32)])

    trainer = qlora(2)
    trainer.fit(_module(), _loader())
    trainer.save_checkpoint(tmp_path / "q.ckpt")
    meta = _load(tmp_path / "q.ckpt")[META_KEY]
    assert sum(bool(e.get("quantized")) for e in meta["fingerprint"]["tensors"]) == 14  # 2 blocks x 7 layers
    # Lightning restores before the plugin quantizes: a 4-bit fingerprint meets a full-precision base.
    again = qlora(3)
    again.fit(_module(), _loader(), ckpt_path=tmp_path / "q.ckpt")
    assert again.global_step == 3
    with pytest.raises(FingerprintMismatchError, match="values differ"):
        qlora(3).fit(_module(seed=1), _loader(), ckpt_path=tmp_path / "q.ckpt")


# --------------------------------------------------------------------------- without a Trainer
def test_causal_lm_load_from_checkpoint_rebuilds_base_method_and_deltas(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    module = CausalLM(str(tmp_path / "base"), lr=1e-2)
    trainer = _trainer(3, [LoRA(r=4, use_dora=True)])
    trainer.fit(module, _loader())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    loaded = CausalLM.load_from_checkpoint(tmp_path / "run.ckpt")
    assert [m.to_dict() for m in applied_methods(loaded)] == [m.to_dict() for m in applied_methods(module)]
    torch.testing.assert_close(_logits(loaded), _logits(module), rtol=0, atol=0)
    # and the CLI exports it
    from lightning_peft.cli import main

    for fmt in ("delta", "peft", "merged"):
        main(
            ["export", "--ckpt", str(tmp_path / "run.ckpt"), "--format", fmt, "--out", str(tmp_path / fmt)]
            + ["--model-class", "lightning_peft.CausalLM"]
        )
    fresh = lightning_peft.load_delta(tiny_llama(), tmp_path / "delta")
    torch.testing.assert_close(_logits(fresh), _logits(module.backbone), rtol=0, atol=0)
    imported = lightning_peft.import_peft(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(_logits(imported), _logits(module.backbone), rtol=1e-5, atol=1e-5)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged), _logits(module.backbone), rtol=1e-4, atol=1e-4)


def test_sequence_classifier_load_from_checkpoint_keeps_the_trained_head(tmp_path):
    tiny_bert_classifier().save_pretrained(tmp_path / "base")
    module = SequenceClassifier(str(tmp_path / "base"), num_labels=2, lr=1e-2)
    LoRAConfig(r=2, target_modules=["query", "value"]).apply(module)  # no callback: the module's hooks work
    trainer = _trainer(3, [])
    trainer.fit(module, _loader("cls"))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    state = _load(tmp_path / "run.ckpt")["state_dict"]
    assert {"backbone.classifier.weight", "backbone.classifier.bias"} <= set(state)
    assert set(state) == set(delta_state_dict(module))
    loaded = SequenceClassifier.load_from_checkpoint(tmp_path / "run.ckpt")
    torch.testing.assert_close(_logits(loaded), _logits(module), rtol=0, atol=0)


# --------------------------------------------------------------------------- any LightningModule
class _Plain(L.LightningModule):
    """A user's own LightningModule: no lightning-peft code in it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = tiny_llama(seed=seed)

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("weights_only", [False, True])
def test_callbacks_make_any_module_save_deltas_and_resume(tmp_path, weights_only):
    module = _Plain()
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last", save_weights_only=weights_only)
    callbacks = [LoRA(r=4), PartialFinetuning(parts=["layernorm"]), saver]
    _trainer(3, callbacks).fit(module, _loader())
    ckpt = _load(tmp_path / "last.ckpt")
    assert list(ckpt["state_dict"]) == list(delta_state_dict(module))
    assert [m["method"] for m in ckpt[META_KEY]["adapters"]] == ["lora", "partial"]
    if weights_only:
        return
    again = _Plain()
    trainer = _trainer(5, [LoRA(r=4), PartialFinetuning(parts=["layernorm"])])
    trainer.fit(again, _loader(), ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 5
    with pytest.raises(FingerprintMismatchError):
        _trainer(5, [LoRA(r=4), PartialFinetuning(parts=["layernorm"])]).fit(
            _Plain(seed=1), _loader(), ckpt_path=tmp_path / "last.ckpt"
        )


def test_with_several_method_callbacks_only_the_first_does_checkpoint_work():
    lora, partial = LoRA(r=2), PartialFinetuning(parts=["layernorm"])
    trainer = _trainer(1, [partial, lora])
    module = _Plain()
    lora.apply(module)
    partial.apply(module)
    checkpoint = {"state_dict": module.state_dict()}
    lora.on_save_checkpoint(trainer, module, checkpoint)
    assert META_KEY not in checkpoint and len(checkpoint["state_dict"]) == len(module.state_dict())
    partial.on_save_checkpoint(trainer, module, checkpoint)
    assert list(checkpoint["state_dict"]) == list(delta_state_dict(module))
    assert [m["method"] for m in checkpoint[META_KEY]["adapters"]] == ["lora", "partial"]
