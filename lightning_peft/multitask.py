"""Several classification tasks on one frozen encoder: one adapter and one head per task.

:class:`MultiTaskClassifier` holds a Hugging Face encoder (``AutoModel``), pools its last
hidden states, and keeps one linear head per task. Each head belongs to the adapter named
after its task (``LoRA(adapter_name="sentiment")`` trains the LoRA weights *and* the
sentiment head), so one base serves every task and each task is a small file
(``save_delta(model, dir, adapter_name="sentiment")``).

:class:`MultiTaskData` reads one set of files whose rows carry a label per task (a review
with its ``label`` and its ``domain``, say). Training interleaves the tasks: every step
holds one batch of each task, each through its own adapter and head (one optimizer over
every task's adapter). Validation reports each task's accuracy and their mean.

Serving mixes tasks in one batch: :meth:`MultiTaskClassifier.classify` routes each row
through its task's adapter (:func:`lightning_peft.adapter_per_row`, one encoder forward)
and its task's head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

from . import checkpointing
from .adapters import adapter_names, adapter_per_row
from .core.ownership import declare_trainable
from .data import read_rows, resolve_data_file
from .hub import resolve_model_path, resolve_model_source
from .methods.base import trainable_named_parameters

__all__ = ["MultiTaskClassifier", "MultiTaskData", "TaskSpec"]

Pooling = Literal["mean", "cls"]
TaskSpec = dict[str, Any]
"""One task of :class:`MultiTaskData`: ``{"label_field": ..., "label_names": [...]}``."""


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(B, H)`` from ``(B, T, H)``: the masked mean, or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class MultiTaskClassifier(L.LightningModule):
    """A frozen encoder with one head per task; the adapter named after a task trains its head.

    Args:
        model: Local folder, hub id, ``"embedded:all-MiniLM-L6-v2"``, or an ``nn.Module``
            (an encoder returning ``last_hidden_state``).
        tasks: Task name -> number of classes, e.g. ``{"sentiment": 2, "domain": 14}``.
            Each name is also the name of the adapter that trains for it.
        label_names: Optional task name -> class names (used by :meth:`classify`).
        pooling: ``"mean"`` (masked mean of the last hidden states, sentence-transformers'
            convention) or ``"cls"`` (the first token).
        lr: Peak learning rate of AdamW.
        weight_decay: Decoupled weight decay for matrices.
        warmup_steps: Linear warmup steps, then cosine decay.
    """

    def __init__(
        self,
        model: str | nn.Module,
        tasks: dict[str, int],
        *,
        label_names: dict[str, list[str]] | None = None,
        pooling: Pooling = "mean",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(tasks, dict) or not tasks:
            raise ValueError(
                f"tasks must map task names to class counts, e.g. {{'sentiment': 2}}; got {tasks!r}"
            )
        bad = {t: n for t, n in tasks.items() if isinstance(n, bool) or not isinstance(n, int) or n < 2}
        if bad:
            raise ValueError(f"every task needs an integer number of classes >= 2; got {bad}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError(
                f"need lr > 0, weight_decay >= 0, warmup_steps >= 0; got {lr}, {weight_decay}, {warmup_steps}"
            )
        names = label_names or {}
        wrong = {t: len(v) for t, v in names.items() if t not in tasks or len(v) != tasks[t]}
        if wrong:
            raise ValueError(f"label_names must give one name per class of a known task; mismatched: {wrong}")
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, nn.Module):
            self.backbone = model
        else:  # from_pretrained returns eval mode; fine-tuning wants dropout on
            self.backbone = AutoModel.from_pretrained(resolve_model_source(model)).train()
        self.backbone.requires_grad_(False)
        if isinstance(getattr(self.backbone, "pooler", None), nn.Module):
            # BERT-style pooler: both poolings read the last hidden states, so it would be an
            # idle layer (adapted by "all-linear" methods, unused parameters under DDP)
            self.backbone.pooler = None
        hidden = self.backbone.config.hidden_size
        self.tasks = dict(tasks)
        self.label_names = {t: list(v) for t, v in names.items()}
        self.pooling = pooling
        self.heads = nn.ModuleDict({task: nn.Linear(hidden, n) for task, n in tasks.items()})
        for task, head in self.heads.items():
            declare_trainable(head, adapter=task)  # the adapter named after the task trains its head
        self.val_acc = nn.ModuleDict(
            {t: torchmetrics.Accuracy(task="multiclass", num_classes=n) for t, n in tasks.items()}
        )

    # -- forward ----------------------------------------------------------------------
    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled ``(B, H)`` representations of a tokenizer-style batch (with the adapters now in use)."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self.backbone(**inputs).last_hidden_state  # (B, T, H)
        mask = inputs.get("attention_mask", torch.ones(hidden.shape[:2], device=hidden.device))
        return _pool(hidden, mask, self.pooling)

    def forward(self, task: str, **batch: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)`` of ``task`` for every row, through that task's adapter alone."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; tasks: {list(self.tasks)}")
        rows = batch["input_ids"].shape[0]
        with adapter_per_row(self, [task] * rows):
            return self.heads[task](self.encode(batch))

    @torch.no_grad()
    def classify(
        self, batch: dict[str, torch.Tensor], tasks: Sequence[str]
    ) -> list[tuple[str, int, str | None]]:
        """Serve a mixed batch: row *i* through task ``tasks[i]``'s adapter and head, one encoder forward.

        Returns:
            ``(task, class id, class name or None)`` per row.
        """
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; tasks: {list(self.tasks)}")
        with adapter_per_row(self, list(tasks)):
            pooled = self.encode(batch)  # (B, H)
        out = []
        for row, task in enumerate(tasks):
            label = int(self.heads[task](pooled[row : row + 1]).argmax(-1))
            names = self.label_names.get(task)
            out.append((task, label, names[label] if names else None))
        return out

    # -- checkpoints ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapters and heads, plus what rebuilds them (a delta checkpoint)."""
        checkpointing.on_save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-apply every recorded adapter, verify the base, refill the frozen tensors.

        So ``MultiTaskClassifier.load_from_checkpoint(path)`` restores every task, no Trainer needed.
        """
        checkpointing.on_load_checkpoint(self, checkpoint)

    # -- steps ------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Check that every task has its adapter (a method callback named after it)."""
        missing = [t for t in self.tasks if t not in adapter_names(self)]
        if missing:
            raise ValueError(
                f"tasks {missing} have no adapter: add a method callback per task named after it, e.g. "
                f"LoRA(adapter_name={missing[0]!r})"
            )

    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        """The sum of every task's cross-entropy on its batch; logs ``train_loss`` and ``train_loss_<task>``."""
        total = 0.0
        for task, part in batch.items():
            if part is None:
                continue
            loss = nn.functional.cross_entropy(self(task, **part), part["labels"])
            self.log(f"train_loss_{task}", loss, batch_size=part["labels"].shape[0])
            total = total + loss
        self.log("train_loss", total, prog_bar=True)
        return total

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Accuracy of the task of this loader; ``val_acc_<task>``, and ``val_acc`` (the mean) at epoch end."""
        task = list(self.tasks)[dataloader_idx]
        logits = self(task, **batch)
        self.val_acc[task](logits.argmax(-1), batch["labels"])
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        self.log(f"val_loss_{task}", loss, batch_size=batch["labels"].shape[0], add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        """Log each task's accuracy and their mean (``val_acc``, what checkpoints monitor)."""
        values = []
        for task, metric in self.val_acc.items():
            if metric.update_called:
                value = metric.compute()
                self.log(f"val_acc_{task}", value, prog_bar=True)
                values.append(value)
            metric.reset()
        if values:
            self.log("val_acc", torch.stack(values).mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        """AdamW over every task's adapter and head, warmup then cosine decay."""
        named = list(trainable_named_parameters(self))
        hp = self.hparams
        decay = [p for _, p in named if p.ndim >= 2]
        flat = [p for _, p in named if p.ndim < 2]
        groups = [
            g
            for g in (
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": flat, "weight_decay": 0.0},
            )
            if g["params"]
        ]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(hp.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1.0 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class MultiTaskData(L.LightningDataModule):
    """Rows with a text and one label per task, read once, tokenized once, one loader per task.

    Args:
        tokenizer: A tokenizer, or a folder / hub id / ``"embedded:..."`` name.
        tasks: Task name -> ``{"label_field": field, "label_names": [...]}``. A label may be
            an integer class id or, with ``label_names``, a class name.
        train_file: Training rows (``.jsonl`` or ``.csv``).
        val_file: Validation rows.
        text_field: The text's field.
        max_length: Longest tokenized text kept.
        batch_size: Rows per batch of each task.
        seed: Seed of the training shuffle.
        root: Folder relative paths are relative to (the CLI passes the recipe's folder).
    """

    def __init__(
        self,
        tokenizer: Any,
        tasks: dict[str, TaskSpec],
        train_file: str,
        val_file: str,
        *,
        text_field: str = "text",
        max_length: int = 128,
        batch_size: int = 32,
        seed: int = 0,
        root: str | None = None,
    ) -> None:
        super().__init__()
        if not tasks or not all(
            isinstance(s, dict) and isinstance(s.get("label_field"), str) for s in tasks.values()
        ):
            raise ValueError(
                f"tasks must map names to {{'label_field': ..., 'label_names': [...]}}; got {tasks!r}"
            )
        self.tasks = {t: dict(s) for t, s in tasks.items()}
        self.files = {
            "train": resolve_data_file("train_file", train_file, root),
            "val": resolve_data_file("val_file", val_file, root),
        }
        self.text_field, self.max_length, self.batch_size, self.seed, self.root = (
            text_field,
            max_length,
            batch_size,
            seed,
            root,
        )
        self._tokenizer_ref = tokenizer
        self._tokenizer: Any = None if isinstance(tokenizer, str) else tokenizer
        self._splits: dict[str, dict[str, list[dict[str, Any]]]] = {}

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(
                resolve_model_path(self._tokenizer_ref, self.root)
            )
        return self._tokenizer

    def _label(self, path: Path, line: int, task: str, value: Any) -> int:
        names = self.tasks[task].get("label_names")
        if isinstance(value, str) and names:
            if value not in names:
                raise ValueError(f"{path}, line {line}: {task} label {value!r} is not one of {names}")
            return names.index(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{path}, line {line}: {task} label {value!r} must be a class id or one of label_names"
            )
        return value

    def split(self, name: str) -> dict[str, list[dict[str, Any]]]:
        """Task -> tokenized examples of split ``name`` (``"train"`` or ``"val"``), read once."""
        if name not in self._splits:
            path = self.files[name]
            fields = [self.text_field, *(s["label_field"] for s in self.tasks.values())]
            rows = list(read_rows(path, list(dict.fromkeys(fields))))
            encoded = self.tokenizer(
                [r[self.text_field] for _, r in rows], truncation=True, max_length=self.max_length
            )
            keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
            self._splits[name] = {
                task: [
                    {
                        **{k: list(encoded[k][i]) for k in keys},
                        "labels": self._label(path, line, task, row[spec["label_field"]]),
                    }
                    for i, (line, row) in enumerate(rows)
                ]
                for task, spec in self.tasks.items()
            }
        return self._splits[name]

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example and stack."""
        longest = max(len(e["input_ids"]) for e in examples)
        pad = {"input_ids": self.tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
        batch = {
            key: torch.tensor(
                [e[key] + [pad[key]] * (longest - len(e[key])) for e in examples], dtype=torch.long
            )
            for key in examples[0]
            if key != "labels"
        }
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return batch

    def _loader(self, data: list[dict[str, Any]], shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            data, batch_size=self.batch_size, shuffle=shuffle, generator=generator, collate_fn=self.collate
        )

    def train_dataloader(self) -> CombinedLoader:
        """One batch of every task per step (the shorter tasks cycle)."""
        loaders = {task: self._loader(data, True) for task, data in self.split("train").items()}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task, in task order."""
        return [self._loader(data, False) for data in self.split("val").values()]
