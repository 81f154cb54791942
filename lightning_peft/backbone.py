"""Loading a module's frozen backbone: from a folder or hub id, deferred until first use.

:func:`load_pretrained` and :func:`random_from_config` build a Hugging Face model from a
folder, hub id or ``embedded:`` name. :class:`DeferredBackbone` lets a LightningModule
remember where its backbone comes from and load it the first time it is needed: inside a
``Trainer`` run whose precision plugin is
:class:`~lightning_peft.plugins.FourBitPrecision` the safetensors stream straight into
4-bit (the full-precision model is never held); anywhere else ``from_pretrained`` loads
it, so every traversal of the module (``parameters()``, ``state_dict()``, ``print``)
sees the backbone as if it had been loaded at construction.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import AutoConfig

from .core.layers import LINEAR_TYPES
from .hub import MODEL_FILES, local_folder, resolve_model_path
from .methods.base import Method
from .plugins import FourBitPrecision
from .progress import library_bars
from .quantization import NoSafetensorsError, quantizable_modules

__all__ = ["DeferredBackbone", "load_pretrained", "quiet_load_report", "random_from_config"]

_LOAD_REPORT_LOGGER = "transformers.modeling_utils"


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Hide transformers' load report ("classifier.weight MISSING ... Consider training") inside the block.

    For loads whose missing tensors a checkpoint restores right after (``load_from_checkpoint``,
    ``lightning-peft validate --ckpt_path ...``): the new head the report lists is the
    trained one a moment later, and a base that differs from the trained one is caught by
    the checkpoint's fingerprint check instead.
    """
    drop = _DropLoadReport()
    logger = logging.getLogger(_LOAD_REPORT_LOGGER)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


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


_SOURCE = "_backbone_source"
"""Attribute (in ``__dict__``) holding where a deferred backbone comes from, until it is loaded."""


class DeferredBackbone:
    """Mixin for a LightningModule whose ``backbone`` may be loaded on first use.

    Put it before ``LightningModule`` in the bases. The module calls :meth:`_defer_backbone`
    instead of loading, and overrides :meth:`_setup_backbone` for what follows loading.
    """

    def _defer_backbone(self, source: str | os.PathLike, auto_class: Any, **load_kwargs: Any) -> None:
        """Remember where the backbone comes from; :meth:`build_backbone` loads it on first use.

        A local path that does not exist, or a hub id that cannot be fetched (or is not in
        the cache while offline), fails here, at construction; the files of a hub id are
        fetched now (to disk), only the loading into memory waits.
        """
        with library_bars():
            local_folder(source, what="model", allow_patterns=MODEL_FILES)
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
        """Hook: what the module does once its backbone exists (declare heads, checkpointing)."""

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
