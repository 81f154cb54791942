"""LightningModules around a frozen Hugging Face backbone: ``CausalLM`` and ``SequenceClassifier``.

The backbone is frozen at construction; a method callback (LoRA, adapters, partial, ...)
decides what trains. The optimizer receives exactly the declared-trainable parameters.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from . import checkpointing
from .core.ownership import declare_trainable
from .core.pooling import check_pooling, use_pooling
from .core.targeting import head_module_names
from .hub import MODEL_FILES, local_folder, pooling_convention, resolve_model_path
from .methods.base import sync_requires_grad, trainable_named_parameters
from .progress import library_bars
from .strategies import prepare_strategy, shard_backbone

Schedule = Literal["cosine", "linear", "constant"]
Pooling = Literal["cls", "mean", "last"]
POOLING_KEY = "lightning_peft_pooling"
"""Checkpoint entry recording what a ``SequenceClassifier``'s head was trained on (hyperparameters can be overridden)."""


def load_pretrained(model: str | os.PathLike | nn.Module, auto_class: Any, **kwargs: Any) -> nn.Module:
    """Load ``model`` with ``auto_class.from_pretrained`` unless it already is an ``nn.Module``."""
    if isinstance(model, nn.Module):
        return model
    with library_bars():  # transformers' and the hub's bars only when ours are on
        source = local_folder(model, what="model", allow_patterns=MODEL_FILES)  # a hub id: cached or fetched
    try:
        with library_bars():
            # from_pretrained returns a model in eval mode; fine-tuning wants train mode
            # (dropout on) like any freshly built nn.Module. Validation switches to eval itself.
            loaded = auto_class.from_pretrained(source, **kwargs).train()
    except OSError as err:
        reason = " ".join(str(err).split())
        raise OSError(f"could not load the model in {source!r}: {reason}") from err
    reference = os.fspath(model)
    if source != resolve_model_path(reference):  # a hub id: named by it, as from_pretrained(hub id) does
        loaded.config.name_or_path = loaded.name_or_path = reference
    return loaded


def random_from_config(model: str | os.PathLike, auto_class: Any, seed: int = 0, **kwargs: Any) -> nn.Module:
    """Build ``model``'s architecture from its ``config.json`` with freshly initialized weights.

    For folders that hold only a config (and a tokenizer). The initialization is seeded by
    ``seed`` without touching the global RNG, so the same folder always gives the same base
    weights (delta-only checkpoints of it can be reloaded).
    """
    if isinstance(model, nn.Module):
        raise ValueError(
            "init='random' needs a model folder or hub id (a config to build from), not a module"
        )
    config = AutoConfig.from_pretrained(local_folder(model, what="model", allow_patterns=["*.json"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto_class.from_config(config, **kwargs)


class _FrozenBackboneModule(L.LightningModule):
    """Shared optimizer, schedule and freezing logic of the task modules."""

    backbone: nn.Module

    def __init__(
        self,
        *,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        schedule: Schedule,
        gradient_checkpointing: bool,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")

    def _finish_backbone(self, gradient_checkpointing: bool) -> None:
        if gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            # Frozen embeddings give checkpointed blocks inputs without grad; this keeps
            # gradients flowing to adapters inside the blocks.
            self.backbone.enable_input_require_grads()
        sync_requires_grad(self)

    def forward(self, **batch: Any) -> Any:
        """Run the backbone on a tokenizer-style batch (plus ``labels``); returns its output."""
        return self.backbone(**batch)

    def configure_model(self) -> None:
        """Shard the backbone with FSDP2 when ``ModelParallelStrategy`` provides a device mesh.

        Lightning calls this after the method callback applied its method, so each
        transformer block is sharded with the method's modules inside it (see
        :func:`lightning_peft.strategies.shard_backbone`). Without a mesh (one device, DDP)
        it does nothing; on a sharded backbone it does nothing, so calling it again is safe.
        """
        if self.device_mesh is None:
            return
        if self._trainer is not None:
            prepare_strategy(self._trainer, self)
        shard_backbone(self, self.device_mesh)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trained tensors, plus the adapters' configs and a base fingerprint."""
        checkpointing.on_save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-apply the recorded methods if needed, verify the base, refill the frozen tensors.

        Runs before Lightning's strict ``load_state_dict``, so ``load_from_checkpoint(path)``
        and ``Trainer.fit(ckpt_path=...)`` restore a delta-only checkpoint exactly.
        """
        checkpointing.on_load_checkpoint(self, checkpoint)

    def configure_optimizers(self) -> Any:
        """AdamW over exactly the declared-trainable parameters, with optional warmup and decay."""
        named = list(trainable_named_parameters(self))
        if not named:
            raise ValueError(
                f"{type(self).__name__} has no trainable parameters: its backbone is frozen. Add a method "
                "callback, e.g. Trainer(callbacks=[LoRA()]) or FullFinetuning()."
            )
        hp = self.hparams
        decay = [p for n, p in named if p.ndim >= 2]
        no_decay = [p for n, p in named if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr)
        if hp.schedule == "constant" and hp.warmup_steps == 0:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(hp.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if hp.schedule == "constant":
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            if hp.schedule == "linear":
                return 1.0 - progress
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SequenceClassifier(_FrozenBackboneModule):
    """A frozen ``AutoModelForSequenceClassification`` whose new task head always trains.

    Args:
        model: Local folder, hub id, ``"embedded:all-MiniLM-L6-v2"``, or an ``nn.Module``.
        num_labels: Number of classes.
        lr: Peak learning rate of AdamW.
        weight_decay: Decoupled weight decay for matrices (biases and norms get none).
        warmup_steps: Linear warmup steps.
        schedule: LR decay after warmup: ``"cosine"``, ``"linear"`` or ``"constant"``.
        gradient_checkpointing: Recompute activations in the backward pass (non-reentrant).
        torch_dtype: dtype to load the weights in (``"float32"``, ``"bfloat16"``...).
        pooling: What the head reads: ``"cls"`` (the model's own head input: BERT's pooled
            ``[CLS]``, a decoder's last non-pad token), ``"mean"`` (the masked mean of the last
            hidden states over the user's tokens) or ``"last"`` (the last token the attention
            mask keeps). ``None`` (the default) follows the checkpoint's own convention:
            what a sentence-transformers checkpoint was trained with (``"mean"`` for
            all-MiniLM-L6-v2), else ``"cls"``. Recorded in checkpoints. Merged and PEFT
            exports need ``"cls"`` (a plain ``AutoModelForSequenceClassification`` cannot mean-pool).
    """

    def __init__(
        self,
        model: str | nn.Module,
        num_labels: int = 2,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: Schedule = "cosine",
        gradient_checkpointing: bool = False,
        torch_dtype: str | None = None,
        pooling: Pooling | None = None,
    ) -> None:
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            schedule=schedule,
            gradient_checkpointing=gradient_checkpointing,
        )
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
        if pooling is not None:
            check_pooling(pooling)
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        kwargs: dict[str, Any] = {"num_labels": num_labels}
        if torch_dtype is not None:
            kwargs["dtype"] = getattr(torch, torch_dtype)
        self.backbone = load_pretrained(model, AutoModelForSequenceClassification, **kwargs)
        source = model if isinstance(model, str | os.PathLike) else self.backbone.config.name_or_path
        self.pooling: str = pooling or pooling_convention(source)
        self.hparams["pooling"] = self.pooling  # the resolved choice, so checkpoints rebuild the same head
        use_pooling(self.backbone, self.pooling)  # before methods apply: an unused pooler is removed
        self.num_labels = num_labels
        heads = [h for h in head_module_names(self) if h.rsplit(".", 1)[-1] in ("classifier", "score")]
        if not heads:
            raise ValueError(f"{type(self.backbone).__name__} has no 'classifier' or 'score' head")
        for name in heads:
            declare_trainable(self.get_submodule(name))
        self._finish_backbone(gradient_checkpointing)
        task = "binary" if num_labels == 2 else "multiclass"
        metric_kw: dict[str, Any] = (
            {"task": task} if task == "binary" else {"task": task, "num_classes": num_labels}
        )
        self.val_acc = torchmetrics.Accuracy(**metric_kw)
        self.val_f1 = torchmetrics.F1Score(**metric_kw, **({} if task == "binary" else {"average": "macro"}))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trained tensors (see the base class) and record the pooling the head was trained on."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[POOLING_KEY] = self.pooling

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with another pooling (its head read other inputs), then restore it."""
        saved = checkpoint.get(POOLING_KEY, "cls")  # checkpoints written before pooling existed read [CLS]
        if saved != self.pooling:
            raise ValueError(
                f"this checkpoint was trained with pooling={saved!r} but the model pools with {self.pooling!r}; "
                f"load it with pooling={saved!r} (e.g. SequenceClassifier.load_from_checkpoint(path, pooling={saved!r}))"
            )
        super().on_load_checkpoint(checkpoint)

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_labels):
            raise ValueError(
                f"label {int(labels.max()) if int(labels.max()) >= self.num_labels else int(labels.min())} is "
                f"outside 0..{self.num_labels - 1} (num_labels={self.num_labels})"
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on the batch; logs ``train_loss``."""
        self._check_labels(batch["labels"])
        loss = self(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Logs ``val_loss``, ``val_acc`` and ``val_f1``."""
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Logs ``test_loss``, ``test_acc`` and ``test_f1`` (reusing the validation metrics' state)."""
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        self._check_labels(batch["labels"])
        out = self(**batch)
        preds = out.logits.argmax(-1)
        self.val_acc(preds, batch["labels"])
        self.val_f1(preds, batch["labels"])
        n = batch["labels"].shape[0]
        self.log(f"{prefix}_loss", out.loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log(f"{prefix}_acc", self.val_acc, prog_bar=True, batch_size=n)
        self.log(f"{prefix}_f1", self.val_f1, batch_size=n)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Predicted class ids."""
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return self(**batch).logits.argmax(-1)


class CausalLM(_FrozenBackboneModule):
    """A frozen ``AutoModelForCausalLM``; a method callback decides what trains.

    Args:
        model: Local folder, hub id, or an ``nn.Module``.
        lr: Peak learning rate of AdamW.
        weight_decay: Decoupled weight decay for matrices (biases and norms get none).
        warmup_steps: Linear warmup steps.
        schedule: LR decay after warmup: ``"cosine"``, ``"linear"`` or ``"constant"``.
        gradient_checkpointing: Recompute activations in the backward pass (non-reentrant).
        torch_dtype: dtype to load the weights in (``"float32"``, ``"bfloat16"``...).
        init: ``"pretrained"`` loads the weights; ``"random"`` builds the architecture from the
            folder's ``config.json`` with seeded random weights (for folders without weights).
    """

    def __init__(
        self,
        model: str | nn.Module,
        *,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: Schedule = "cosine",
        gradient_checkpointing: bool = False,
        torch_dtype: str | None = None,
        init: Literal["pretrained", "random"] = "pretrained",
    ) -> None:
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            schedule=schedule,
            gradient_checkpointing=gradient_checkpointing,
        )
        if init not in ("pretrained", "random"):
            raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        kwargs: dict[str, Any] = {}
        if torch_dtype is not None:
            kwargs["dtype"] = getattr(torch, torch_dtype)
        if init == "random":
            self.backbone = random_from_config(model, AutoModelForCausalLM, **kwargs)
        else:
            self.backbone = load_pretrained(model, AutoModelForCausalLM, **kwargs)
        self._finish_backbone(gradient_checkpointing)
        self.eval_loss_mean = torchmetrics.MeanMetric()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Next-token loss on the tokens whose label is not -100; logs ``train_loss``."""
        loss = self(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulates the token-weighted loss; ``val_loss`` and ``val_ppl`` are logged at epoch end."""
        self._accumulate(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulates the token-weighted loss; ``test_loss`` and ``test_ppl`` are logged at epoch end."""
        self._accumulate(batch)

    def _accumulate(self, batch: dict[str, torch.Tensor]) -> None:
        loss = self(**batch).loss
        tokens = (batch["labels"][:, 1:] != -100).sum()
        self.eval_loss_mean.update(loss.detach(), weight=tokens)

    def on_validation_epoch_end(self) -> None:
        """Log ``val_loss`` and ``val_ppl = exp(val_loss)`` over all validation tokens (all ranks)."""
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        """Log ``test_loss`` and ``test_ppl = exp(test_loss)`` over all test tokens (all ranks)."""
        self._log_epoch("test")

    def _log_epoch(self, prefix: str) -> None:
        if self.eval_loss_mean.weight == 0 and not self.trainer.world_size > 1:
            return
        loss = self.eval_loss_mean.compute()
        self.eval_loss_mean.reset()
        self.log(f"{prefix}_loss", loss, prog_bar=True)
        self.log(f"{prefix}_ppl", torch.exp(loss.clamp(max=50)))

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Per-example mean negative log-likelihood of the labelled tokens, shape ``(B,)``.

        With :class:`~lightning_peft.data.InstructionData` those are the response tokens, so
        ``exp`` of a value is the response's perplexity under the model. Examples without a
        labelled token get ``nan``. For text, call :meth:`generate`.
        """
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = self(**inputs).logits[:, :-1].float()  # (B, T-1, V)
        target = labels[:, 1:]  # (B, T-1)
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=-100, reduction="none"
        )  # (B, T-1)
        counted = (target != -100).sum(-1)  # (B,)
        return nll.sum(-1) / counted  # (B,), nan where nothing is labelled

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``backbone.generate`` (with whatever the active method learned)."""
        return self.backbone.generate(*args, **kwargs)
