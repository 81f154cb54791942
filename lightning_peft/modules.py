"""LightningModules around a frozen Hugging Face backbone: ``CausalLM`` and ``SequenceClassifier``.

The backbone is frozen; a method callback (LoRA, adapters, partial, ...) decides what
trains. The optimizer receives exactly the declared-trainable parameters.

Given a folder or hub id, a module loads its backbone when it is first needed, not at
construction: inside a ``Trainer`` run that is while the run is set up, and with
:class:`~lightning_peft.plugins.FourBitPrecision` in the Trainer the weights are streamed
straight into 4-bit (the full-precision model is never held). Outside a run (or without
the plugin) the first use of the module loads it as ``from_pretrained`` does, so
``CausalLM(path).backbone``, ``.parameters()``, ``.state_dict()`` or ``print(...)`` work
as if it had been loaded at construction. A module passed in is used as it is.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from . import checkpointing
from .core.layers import LINEAR_TYPES
from .core.ownership import declare_trainable
from .core.targeting import head_module_names
from .hub import local_folder, resolve_model_source
from .methods.base import Method, sync_requires_grad, trainable_named_parameters
from .plugins import FourBitPrecision
from .quantization import NoSafetensorsError, quantizable_modules
from .strategies import prepare_strategy, shard_backbone

Schedule = Literal["cosine", "linear", "constant"]


def load_pretrained(model: str | os.PathLike | nn.Module, auto_class: Any, **kwargs: Any) -> nn.Module:
    """Load ``model`` with ``auto_class.from_pretrained`` unless it already is an ``nn.Module``."""
    if isinstance(model, nn.Module):
        return model
    source = resolve_model_source(model)
    try:
        # from_pretrained returns a model in eval mode; fine-tuning wants train mode
        # (dropout on) like any freshly built nn.Module. Validation switches to eval itself.
        return auto_class.from_pretrained(source, **kwargs).train()
    except OSError as err:
        raise OSError(
            f"could not load {source!r} as a local folder or hub id ({err}). Without internet, pass a "
            "local folder that holds config.json and the weights."
        ) from err


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
    config = AutoConfig.from_pretrained(resolve_model_source(model))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto_class.from_config(config, **kwargs)


_SOURCE = "_backbone_source"
"""Attribute (in ``__dict__``) holding where a deferred backbone comes from, until it is loaded."""


class _FrozenBackboneModule(L.LightningModule):
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

    # -- the backbone ---------------------------------------------------------------------
    def _defer_backbone(self, source: str | os.PathLike, auto_class: Any, **load_kwargs: Any) -> None:
        """Remember where the backbone comes from; :meth:`build_backbone` loads it on first use.

        A local path that does not exist fails here, at construction.
        """
        resolve_model_source(source)
        self.__dict__[_SOURCE] = (source, auto_class, load_kwargs)

    @property
    def backbone_pending(self) -> bool:
        """Whether the backbone is still to be loaded (a folder or hub id given, not used yet)."""
        return _SOURCE in self.__dict__

    def build_backbone(self) -> nn.Module:
        """Load the backbone now if it was deferred, and return it.

        Inside a ``Trainer`` run whose precision plugin is
        :class:`~lightning_peft.plugins.FourBitPrecision`, the safetensors are streamed
        one tensor at a time straight into 4-bit on the run's device
        (:meth:`FourBitPrecision.load_backbone <lightning_peft.plugins.FourBitPrecision.load_backbone>`):
        the full-precision model is never held. Otherwise the model is loaded with
        ``from_pretrained``, as at construction. Does nothing if the backbone exists.
        """
        source = self.__dict__.pop(_SOURCE, None)
        if source is None:
            return self._modules["backbone"]
        model, auto_class, kwargs = source
        try:
            trainer = self._trainer
            plugin = getattr(trainer, "precision_plugin", None)
            backbone = None
            if isinstance(plugin, FourBitPrecision):
                config_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
                try:
                    only = self._layers_to_quantize(plugin, trainer, model, auto_class, config_kwargs)
                    backbone = plugin.load_backbone(
                        model,
                        auto_class,
                        trainer,
                        dtype=kwargs.get("dtype", "auto"),
                        prefix="backbone.",
                        only=only,
                        **config_kwargs,
                    )
                except NoSafetensorsError as err:
                    rank_zero_warn(
                        f"{err}. Loading it in full precision instead; FourBitPrecision quantizes it afterwards."
                    )
            if backbone is None:
                backbone = load_pretrained(model, auto_class, **kwargs)
        except BaseException:
            self.__dict__[_SOURCE] = source  # nothing changed: a later use tries again
            raise
        backbone.train(self.training)
        self.backbone = backbone
        self._setup_backbone()
        return backbone

    def _layers_to_quantize(
        self, plugin: FourBitPrecision, trainer: Any, source: Any, auto_class: Any, config_kwargs: dict
    ) -> set[str] | None:
        """The backbone layers to stream into 4-bit: those no method of the run will train.

        A method may train base linear layers (``PartialFinetuning(last_n_layers=2)``,
        ``FullFinetuning``); ``convert_module`` leaves those in full precision because it
        runs after the method. Streaming runs before, so the run's methods are first applied
        to a copy of this module around a skeleton of the model on the ``meta`` device (no
        memory, the RNG state restored), and the plugin's own rule picks the layers there.
        ``None`` (every layer the rule selects) when the run has no method callback.
        """
        methods = [c for c in getattr(trainer, "callbacks", None) or [] if isinstance(c, Method)]
        if not methods:
            return None
        folder = local_folder(source, what="model", allow_patterns=["*.json"])
        config = AutoConfig.from_pretrained(folder, **config_kwargs)
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            skeleton = auto_class.from_config(config)
            names = {id(m): n for n, m in skeleton.named_modules() if isinstance(m, LINEAR_TYPES)}
            shell = copy.copy(self)  # the same class and settings; its own module registries
            for key, value in list(vars(shell).items()):
                if isinstance(value, dict):
                    vars(shell)[key] = copy.copy(value)
            vars(shell).pop(_SOURCE, None)
            skeleton.requires_grad_(False)
            shell.backbone = skeleton
            shell._setup_backbone()
            for method in methods:
                method.config().apply(shell)
            chosen = quantizable_modules(shell, plugin.skip_modules, skip_heads=not plugin.quantize_heads)
        return {names[id(m)] for _, m in chosen if id(m) in names}

    def _setup_backbone(self) -> None:
        """What each task does once its backbone exists (declare heads, gradient checkpointing)."""
        self._finish_backbone(self._gradient_checkpointing)

    def __getattr__(self, name: str) -> Any:
        if name == "backbone" and _SOURCE in self.__dict__:
            return self.build_backbone()
        return super().__getattr__(name)

    # Every traversal of the module sees the backbone: a deferred one is loaded first. (Not
    # ``children()``: Lightning walks it when attaching the Trainer, before the run's
    # precision plugin can take part in loading.)
    def named_modules(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        if _SOURCE in self.__dict__:
            self.build_backbone()
        return super().named_modules(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        if _SOURCE in self.__dict__:
            self.build_backbone()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        if _SOURCE in self.__dict__:
            self.build_backbone()
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        if _SOURCE in self.__dict__:
            self.build_backbone()
        return super()._apply(*args, **kwargs)

    def __repr__(self) -> str:
        if _SOURCE in self.__dict__:
            self.build_backbone()
        return super().__repr__()

    def forward(self, **batch: Any) -> Any:
        """Run the backbone on a tokenizer-style batch (plus ``labels``); returns its output."""
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
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        kwargs: dict[str, Any] = {"num_labels": num_labels}
        if torch_dtype is not None:
            kwargs["dtype"] = getattr(torch, torch_dtype)
        self.num_labels = num_labels
        if isinstance(model, nn.Module):
            self.backbone = load_pretrained(model, AutoModelForSequenceClassification, **kwargs)
            self._setup_backbone()
        else:  # loaded on first use (streamed into 4-bit under FourBitPrecision): see build_backbone
            self._defer_backbone(model, AutoModelForSequenceClassification, **kwargs)
        task = "binary" if num_labels == 2 else "multiclass"
        metric_kw: dict[str, Any] = (
            {"task": task} if task == "binary" else {"task": task, "num_classes": num_labels}
        )
        self.val_acc = torchmetrics.Accuracy(**metric_kw)
        self.val_f1 = torchmetrics.F1Score(**metric_kw, **({} if task == "binary" else {"average": "macro"}))

    def _setup_backbone(self) -> None:
        heads = [h for h in head_module_names(self) if h.rsplit(".", 1)[-1] in ("classifier", "score")]
        if not heads:
            raise ValueError(f"{type(self.backbone).__name__} has no 'classifier' or 'score' head")
        for name in heads:
            declare_trainable(self.get_submodule(name))
        super()._setup_backbone()

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

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``backbone.generate`` (with whatever the active method learned)."""
        return self.backbone.generate(*args, **kwargs)
