"""Every optimizer chosen the Lightning way updates exactly the declared-trainable parameters.

LightningCLI's ``--optimizer``/``--lr_scheduler`` flags, a recipe's ``optimizer:`` section, a
factory passed from Python, and bitsandbytes' 8-bit and paged optimizers through each of them
(issue 12, items 1 and 2). The real ``lightning-peft fit --optimizer ...`` command is run in
``test_cli_runs.py``.
"""

from __future__ import annotations

import re
import warnings
from functools import partial

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from lightning_peft import SequenceClassifier
from lightning_peft.callbacks import LoRA
from lightning_peft.cli import build_cli
from lightning_peft.hub import resolve_model_path
from lightning_peft.methods.base import trainable_named_parameters

from conftest import RECIPES, fit_recipe, minilm_batches

SHORT = ["--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--data.init_args.batch_size=8"]


def _held(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}


def _lora_b(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_b" in n}


def _fit(module: L.LightningModule, batches, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[LoRA(r=4, alpha=8, target_modules="all-linear")],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def _assert_exactly_trainable(module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
    trainable = {id(p) for _, p in trainable_named_parameters(module)}
    assert _held(optimizer) == trainable
    assert any("lora_b" in n for n, _ in trainable_named_parameters(module))


# --------------------------------------------------------------------------- the CLI flags
def test_cli_optimizer_flag_trains_the_method(tmp_path, monkeypatch):
    built = fit_recipe(
        "minilm-sentiment/lora.yaml",
        tmp_path,
        monkeypatch,
        *SHORT,
        "--optimizer=torch.optim.SGD",
        "--optimizer.lr=0.5",
        "--optimizer.weight_decay=0.01",
    )
    optimizer = built.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD
    _assert_exactly_trainable(built.model, optimizer)
    moved = _lora_b(built.model)
    assert moved and all(t.abs().max() > 0 for t in moved.values()), "lora_b must leave zero"
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])
    assert decay["initial_lr"] == 0.5  # the recipe's warmup + cosine still scale it
    assert built.config.fit.optimizer is None  # handed to the model, not built by LightningCLI
    assert built.config.fit.model.init_args.optimizer.class_path == "torch.optim.SGD"


def test_cli_lr_scheduler_flag_replaces_the_module_schedule(tmp_path, monkeypatch):
    built = fit_recipe(
        "minilm-sentiment/lora.yaml",
        tmp_path,
        monkeypatch,
        *SHORT,
        "--optimizer=torch.optim.AdamW",
        "--lr_scheduler=torch.optim.lr_scheduler.StepLR",
        "--lr_scheduler.step_size=1",
    )
    (config,) = built.trainer.lr_scheduler_configs
    assert type(config.scheduler) is torch.optim.lr_scheduler.StepLR
    assert config.interval == "epoch"
    _assert_exactly_trainable(built.model, built.trainer.optimizers[0])


def _recipe(tmp_path, extra: str = "", model: str | None = None):
    """The LoRA MiniLM recipe in ``tmp_path`` (data paths made absolute), with ``extra`` appended."""
    text = (RECIPES / "minilm-sentiment" / "lora.yaml").read_text()
    text = text.replace("data/", f"{RECIPES / 'minilm-sentiment' / 'data'}/")
    if model is not None:
        text = text.replace("class_path: lightning_peft.SequenceClassifier", f"class_path: {model}")
        text = re.sub(r"\n    (num_labels|pooling|lr|warmup_steps|label_names): [^\n]*", "", text)
    path = tmp_path / "recipe.yaml"
    path.write_text(text + extra)
    return path


def test_recipe_optimizer_sections(tmp_path, monkeypatch):
    extra = (
        "optimizer:\n  class_path: torch.optim.Adagrad\n  init_args:\n    lr: 0.05\n"
        "lr_scheduler:\n  class_path: torch.optim.lr_scheduler.ReduceLROnPlateau\n  init_args:\n    patience: 2\n"
    )
    built = fit_recipe(str(_recipe(tmp_path, extra)), tmp_path, monkeypatch, *SHORT)
    optimizer = built.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.Adagrad and optimizer.param_groups[0]["lr"] == 0.05
    _assert_exactly_trainable(built.model, optimizer)
    (config,) = built.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert config.monitor == "val_loss"


class PlainClassifier(L.LightningModule):
    """A LightningModule of a user's own: no optimizer argument, no configure_optimizers."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.net = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(model), num_labels=2)

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(**batch).loss)


def test_cli_optimizer_flag_on_a_module_of_ones_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, model="test_optimizers.PlainClassifier")
    assert "num_labels" not in recipe.read_text().split("data:")[0]
    built = build_cli(
        [
            "fit",
            "--config",
            str(recipe),
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            *SHORT,
            "--optimizer=torch.optim.SGD",
            "--optimizer.lr=0.5",
        ]
    )
    optimizer = built.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD
    _assert_exactly_trainable(built.model, optimizer)
    assert all(t.abs().max() > 0 for t in _lora_b(built.model).values())


# --------------------------------------------------------------------------- from Python
def test_python_optimizer_factory_keeps_grouping_and_warmup(minilm_path):
    module = SequenceClassifier(
        minilm_path, warmup_steps=10, optimizer=partial(torch.optim.SGD, lr=0.5, weight_decay=0.1)
    )
    trainer = _fit(module, minilm_batches(minilm_path, n=3), steps=2)
    optimizer = trainer.optimizers[0]
    _assert_exactly_trainable(module, optimizer)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    (config,) = trainer.lr_scheduler_configs
    assert config.interval == "step"
    warmup = config.scheduler.lr_lambdas[0]  # the module's warmup (clipped to the run's 2 steps), then cosine
    assert [warmup(0), warmup(1)] == pytest.approx([1 / 3, 2 / 3])
    assert optimizer.param_groups[0]["initial_lr"] == 0.5
    assert all(t.abs().max() > 0 for t in _lora_b(module).values())
    assert "optimizer" not in module.hparams  # checkpoints stay loadable with weights_only=True


def test_python_scheduler_and_checkpoint_with_weights_only(minilm_path, tmp_path):
    module = SequenceClassifier(
        minilm_path,
        optimizer=torch.optim.Adam,
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    trainer = _fit(module, minilm_batches(minilm_path, n=3), steps=2)
    assert type(trainer.lr_scheduler_configs[0].scheduler) is torch.optim.lr_scheduler.StepLR
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == {f"{n}" for n, _ in trainable_named_parameters(module)}
    restored = SequenceClassifier.load_from_checkpoint(tmp_path / "run.ckpt")
    assert restored.optimizer_factory is None  # a resumed run passes its optimizer again


# --------------------------------------------------------------------------- bitsandbytes
@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit", "PagedAdamW"])
def test_bitsandbytes_optimizer_from_the_command_line(name, tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        built = fit_recipe(
            "minilm-sentiment/lora.yaml",
            tmp_path,
            monkeypatch,
            *SHORT,
            f"--optimizer=bitsandbytes.optim.{name}",
            "--optimizer.lr=0.002",
        )
    optimizer = built.trainer.optimizers[0]
    assert type(optimizer) is getattr(bnb.optim, name)
    _assert_exactly_trainable(built.model, optimizer)
    assert all(t.abs().max() > 0 for t in _lora_b(built.model).values())
    states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"]]
    assert all(s for s in states), "every trainable parameter took a step"
    eight_bit = [s for s in states if s["state1"].dtype == torch.uint8]
    if name.endswith("8bit"):
        # bitsandbytes keeps 8-bit moments for tensors of min_8bit_size (4096) values and more:
        # LoRA's 8 x 1536 matrices of the feed-forward layers, not the 8 x 384 ones
        big = [p for g in optimizer.param_groups for p in g["params"] if p.numel() >= 4096]
        assert len(eight_bit) == len(big) > 0
        assert all(s["state2"].dtype == torch.uint8 for s in eight_bit)
    else:
        assert not eight_bit
