"""LightningModules around a frozen Hugging Face backbone: ``CausalLM`` and ``SequenceClassifier``.

The backbone is frozen; a method callback (LoRA, adapters, partial, ...) decides what
trains. The optimizer receives exactly the declared-trainable parameters, whichever
optimizer is chosen: the default AdamW, an ``optimizer``/``lr_scheduler`` given to the
module (from Python, a recipe, or LightningCLI's ``--optimizer``/``--lr_scheduler`` flags,
which ``lightning-peft`` routes here), a ``bitsandbytes`` 8-bit or paged optimizer
included. Building the optimizer in ``configure_optimizers`` means it is built after the
method callback injected its modules, never from the bare backbone.

Given a folder or hub id, a module loads its backbone when it is first needed, not at
construction: inside a ``Trainer`` run that is while the run is set up, and with
:class:`~lightning_peft.plugins.FourBitPrecision` in the Trainer the weights are streamed
straight into 4-bit (the full-precision model is never held). Outside a run (or without
the plugin) the first use of the module loads it as ``from_pretrained`` does, so
``CausalLM(path).backbone``, ``.parameters()``, ``.state_dict()`` or ``print(...)`` work
as if it had been loaded at construction. A module passed in is used as it is.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from . import checkpointing, optimizers
from .adapters import adapter_per_row
from .backbone import DeferredBackbone, load_pretrained, quiet_load_report, random_from_config
from .core.ownership import declare_trainable
from .core.pooling import check_pooling, use_pooling
from .core.targeting import head_module_names
from .data import load_tokenizer
from .hub import pooling_convention
from .methods.base import Method, sync_requires_grad, trainable_named_parameters
from .optimizers import LRSchedulerCallable, OptimizerCallable, Schedule
from .strategies import prepare_strategy, shard_backbone

Pooling = Literal["cls", "mean", "last"]
POOLING_KEY = "lightning_peft_pooling"
"""Checkpoint entry recording what a ``SequenceClassifier``'s head was trained on (hyperparameters can be overridden)."""


def _not_hyperparameters(model: Any) -> list[str]:
    """Init arguments kept out of ``hparams``: a module given as a model, and the optimizer factories.

    Checkpoints stay loadable with ``torch.load(weights_only=True)`` (Lightning's default), and
    the factories are needed for training only: a run that resumes passes them again.
    """
    return ["optimizer", "lr_scheduler"] + (["model"] if isinstance(model, nn.Module) else [])


def label_config(label_names: list[str] | None, num_labels: int) -> dict[str, dict[Any, Any]]:
    """``{"id2label": ..., "label2id": ...}`` of a Hugging Face config for ``label_names`` (``{}`` for none).

    Raises:
        ValueError: If the names are not ``num_labels`` distinct non-empty strings.
    """
    if label_names is None:
        return {}
    names = list(label_names)
    if (
        len(names) != num_labels
        or len(set(names)) != len(names)
        or not all(isinstance(n, str) and n for n in names)
    ):
        raise ValueError(
            f"label_names must be {num_labels} distinct names, one per label 0..{num_labels - 1} "
            f"(num_labels={num_labels}); got {label_names!r}"
        )
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


class _FrozenBackboneModule(DeferredBackbone, L.LightningModule):
    """Shared optimizer, schedule, freezing and backbone-loading logic of the task modules."""

    backbone: nn.Module

    def __init__(
        self,
        *,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        schedule: Schedule,
        gradient_checkpointing: bool,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self._tokenizer_ref = tokenizer
        self._tokenizer: Any = None
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")
        self._gradient_checkpointing = bool(gradient_checkpointing)

    def _finish_backbone(self, gradient_checkpointing: bool) -> None:
        if gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            # Frozen embeddings give checkpointed blocks inputs without grad; this keeps
            # gradients flowing to adapters inside the blocks.
            self.backbone.enable_input_require_grads()
        sync_requires_grad(self)

    def _setup_backbone(self) -> None:
        """What each task does once its backbone exists (declare heads, gradient checkpointing)."""
        self._finish_backbone(self._gradient_checkpointing)

    def forward(self, **batch: Any) -> Any:
        """Run the backbone on a tokenizer-style batch (plus ``labels``); returns its output.

        A batch may carry ``adapter_names``, one adapter name (or ``None``) per row: row *i*
        then runs through adapter *i* alone (see :func:`lightning_peft.adapter_per_row`).
        """
        names = batch.pop("adapter_names", None)
        if names is None:
            return self.backbone(**batch)
        with adapter_per_row(self, list(names)):
            return self.backbone(**batch)

    def configure_model(self) -> None:
        """Load a deferred backbone; shard it with FSDP2 when ``ModelParallelStrategy`` provides a device mesh.

        A backbone given as a folder or hub id is loaded here unless something used it
        before (see :meth:`build_backbone`: under ``FourBitPrecision`` it is streamed into
        4-bit on each rank). With a mesh, the Trainer's method callbacks are applied (if
        they were not yet) and each transformer block is sharded with the method's modules
        inside it (see :func:`lightning_peft.strategies.shard_backbone`). Without a mesh
        (one device, DDP) nothing else happens; on a sharded backbone nothing happens, so
        calling it again is safe.
        """
        self.build_backbone()
        if self.device_mesh is None:
            return
        if self._trainer is not None:
            prepare_strategy(self._trainer, self)
            for callback in self._trainer.callbacks:
                if isinstance(callback, Method):  # a method must be in place before sharding
                    callback.apply(self)
        shard_backbone(self, self.device_mesh)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``: rebuild base + method + trained tensors from a checkpoint.

        transformers' load report about the new head is not shown: the checkpoint restores
        that head (and the fingerprint check catches any other difference of the base).
        """
        with quiet_load_report():
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trained tensors, plus the adapters' configs and a base fingerprint."""
        checkpointing.on_save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Re-apply the recorded methods if needed, verify the base, refill the frozen tensors.

        Runs before Lightning's strict ``load_state_dict``, so ``load_from_checkpoint(path)``
        and ``Trainer.fit(ckpt_path=...)`` restore a delta-only checkpoint exactly.
        """
        checkpointing.on_load_checkpoint(self, checkpoint)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the run (loaded on first use), saved with merged exports; ``None`` if there is none.

        ``tokenizer`` (the init argument: a folder, hub id or ``embedded:`` name) when it was
        given, else the model's own folder or hub id when that holds a tokenizer.
        """
        if self._tokenizer is None:
            ref = self._tokenizer_ref
            explicit = ref is not None
            ref = ref if explicit else self.hparams.get("model")
            if not isinstance(ref, str | os.PathLike):
                return None
            try:
                self._tokenizer = load_tokenizer(ref)
            except (OSError, ValueError) as err:
                if explicit:
                    raise OSError(f"cannot load the tokenizer {ref!r}: {err}") from err
                return None
        return self._tokenizer

    def configure_optimizers(self) -> Any:
        """The optimizer over exactly the declared-trainable parameters, with its schedule.

        Built here, after the method callback applied its method; see
        :func:`lightning_peft.optimizers.configure` (AdamW, or the ``optimizer`` factory;
        matrices decay, vectors do not; warmup and ``schedule``, or the ``lr_scheduler``).
        """
        named = list(trainable_named_parameters(self))
        if not named:
            raise ValueError(
                f"{type(self).__name__} has no trainable parameters: its backbone is frozen. Add a method "
                "callback, e.g. Trainer(callbacks=[LoRA()]) or FullFinetuning()."
            )
        hp = self.hparams
        return optimizers.configure(
            named,
            optimizer=self.optimizer_factory,
            lr_scheduler=self.lr_scheduler_factory,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            warmup_steps=hp.warmup_steps,
            schedule=hp.schedule,
            total_steps=lambda: self.trainer.estimated_stepping_batches,
        )


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
        optimizer: Builds the optimizer from the parameter groups, e.g. ``torch.optim.SGD``,
            ``functools.partial(bitsandbytes.optim.PagedAdamW8bit, lr=2e-4)``; in a recipe,
            ``class_path`` + ``init_args`` (LightningCLI's ``--optimizer`` lands here). ``None``:
            AdamW with ``lr`` and ``weight_decay``.
        lr_scheduler: Builds a scheduler from the optimizer (``--lr_scheduler`` lands here);
            it replaces ``warmup_steps`` and ``schedule``.
        label_names: Class names in label order (``["negative", "positive"]``): the exported
            model's ``id2label``/``label2id``. ``lightning-peft`` takes them from the data module.
        tokenizer: The tokenizer of the run (a folder, hub id or ``embedded:`` name), saved
            with merged exports; by default the model's own. ``lightning-peft`` takes the data
            module's.
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
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_names: list[str] | None = None,
        tokenizer: str | None = None,
        pooling: Pooling | None = None,
    ) -> None:
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            schedule=schedule,
            gradient_checkpointing=gradient_checkpointing,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            tokenizer=tokenizer,
        )
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
        if pooling is not None:
            check_pooling(pooling)
        labels = label_config(label_names, num_labels)
        self.save_hyperparameters(ignore=_not_hyperparameters(model))
        kwargs: dict[str, Any] = {"num_labels": num_labels, **labels}
        if torch_dtype is not None:
            kwargs["dtype"] = getattr(torch, torch_dtype)
        self.num_labels = num_labels
        if isinstance(model, nn.Module):
            self.backbone = load_pretrained(model, AutoModelForSequenceClassification, **kwargs)
            if labels and hasattr(self.backbone, "config"):
                self.backbone.config.update(labels)
        else:  # loaded on first use (streamed into 4-bit under FourBitPrecision): see build_backbone
            self._defer_backbone(model, AutoModelForSequenceClassification, **kwargs)
        source = model if isinstance(model, str | os.PathLike) else self.backbone.config.name_or_path
        self.pooling: str = pooling or pooling_convention(source)
        self.hparams["pooling"] = self.pooling  # the resolved choice, so checkpoints rebuild the same head
        if isinstance(model, nn.Module):
            self._setup_backbone()
        task = "binary" if num_labels == 2 else "multiclass"
        metric_kw: dict[str, Any] = (
            {"task": task} if task == "binary" else {"task": task, "num_classes": num_labels}
        )
        self.val_acc = torchmetrics.Accuracy(**metric_kw)
        self.val_f1 = torchmetrics.F1Score(**metric_kw, **({} if task == "binary" else {"average": "macro"}))

    def _setup_backbone(self) -> None:
        use_pooling(self.backbone, self.pooling)  # before methods apply: an unused pooler is removed
        heads = [h for h in head_module_names(self) if h.rsplit(".", 1)[-1] in ("classifier", "score")]
        if not heads:
            raise ValueError(f"{type(self.backbone).__name__} has no 'classifier' or 'score' head")
        for name in heads:
            declare_trainable(self.get_submodule(name))
        super()._setup_backbone()

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
        optimizer: Builds the optimizer from the parameter groups (see :class:`SequenceClassifier`);
            ``None``: AdamW with ``lr`` and ``weight_decay``.
        lr_scheduler: Builds a scheduler from the optimizer; it replaces ``warmup_steps`` and ``schedule``.
        tokenizer: The tokenizer of the run, saved with merged exports; by default the model's own.
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
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__(
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            schedule=schedule,
            gradient_checkpointing=gradient_checkpointing,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            tokenizer=tokenizer,
        )
        if init not in ("pretrained", "random"):
            raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
        self.save_hyperparameters(ignore=_not_hyperparameters(model))
        kwargs: dict[str, Any] = {}
        if torch_dtype is not None:
            kwargs["dtype"] = getattr(torch, torch_dtype)
        if init == "random":
            self.backbone = random_from_config(model, AutoModelForCausalLM, **kwargs)
            self._setup_backbone()
        elif isinstance(model, nn.Module):
            self.backbone = load_pretrained(model, AutoModelForCausalLM, **kwargs)
            self._setup_backbone()
        else:  # loaded on first use (streamed into 4-bit under FourBitPrecision): see build_backbone
            self._defer_backbone(model, AutoModelForCausalLM, **kwargs)
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

    def generate(
        self, *args: Any, adapter_names: list[str | None] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """``backbone.generate`` with the active adapters, or row *i* with ``adapter_names[i]``."""
        if adapter_names is None:
            return self.backbone.generate(*args, **kwargs)
        with adapter_per_row(self, list(adapter_names)):
            return self.backbone.generate(*args, **kwargs)
