"""``export_merged``: a plain Hugging Face folder with every active adapter folded into the weights."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..core.pooling import refuse_pooled_export
from ..core.sharded import unwrapped_name
from ..core.targeting import find_backbone
from ..merging import merged_state_dict
from ..progress import library_bars
from .files import write_once
from .state import full_parameters

__all__ = ["export_merged"]


def export_merged(
    obj: nn.Module, directory: str | os.PathLike, dtype: torch.dtype = torch.float32, *, tokenizer: Any = None
) -> str:
    """Write a plain ``save_pretrained`` folder with every active adapter folded into the weights.

    The Hugging Face model inside ``obj`` is rebuilt from its config (on the ``meta``
    device, so nothing big is allocated twice), filled with
    :func:`lightning_peft.merging.merged_state_dict` (4-bit bases dequantized), and saved.
    The folder has no adapter tensors and loads with bare ``transformers``. The live model
    is not changed. The tokenizer (``tokenizer``, else a ``tokenizer`` attribute of ``obj``:
    ``SequenceClassifier``/``CausalLM`` have one) is saved beside it, and a warning says so
    when there is none. The config is the live model's, so a classifier's ``id2label``
    (``SequenceClassifier(label_names=...)``) comes along.

    Safe on every rank of a distributed run (DDP, FSDP2, FSDP): every rank gathers, rank 0
    writes, the others wait.

    Args:
        obj: A LightningModule or ``nn.Module`` holding a Hugging Face ``PreTrainedModel``.
        directory: Output folder (created).
        dtype: dtype of the written weights.
        tokenizer: The tokenizer to save with the model.

    Returns:
        The folder path.

    Raises:
        ValueError: If ``obj`` holds no Hugging Face model; :class:`~lightning_peft.methods.MethodError`
            (a ``ValueError``) if an active adapter cannot be folded (its message names the
            formats that work); ``ValueError`` for a classifier that pools otherwise than its
            plain Hugging Face class (``SequenceClassifier(pooling="mean")``).
    """
    refuse_pooled_export(obj, "export_merged")
    backbone = find_backbone(obj)
    if not isinstance(backbone, PreTrainedModel):
        raise ValueError(
            f"export_merged needs a Hugging Face PreTrainedModel inside {type(obj).__name__}; "
            "for other models use merge(model) and torch.save(model.state_dict())"
        )
    config = copy.deepcopy(backbone.config)
    config.dtype = dtype
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        clean = type(backbone)(config)
    with full_parameters(obj):  # FSDP1: every unit gathered (a collective); what is kept here are copies
        state = merged_state_dict(obj, dtype, reference=clean, within=backbone)
        expected = set(clean.state_dict())
        unexpected = sorted(set(state) - expected)
        if unexpected:
            raise ValueError(
                f"the model holds tensors a plain {type(backbone).__name__} has no place for "
                f"({unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); export the adapters with export_peft "
                "or save_delta instead"
            )
        missing = clean.load_state_dict(state, strict=False, assign=True).missing_keys
        if missing:
            raise ValueError(f"merged state dict lacks {missing[:5]} of {type(backbone).__name__}")
        clean.tie_weights()
        _materialize_buffers(clean, backbone)
    clean.eval()
    tokenizer = tokenizer if tokenizer is not None else getattr(obj, "tokenizer", None)
    if not hasattr(tokenizer, "save_pretrained"):
        warnings.warn(
            f"export_merged: no tokenizer is saved in {os.fspath(directory)} (pass tokenizer=...); "
            "AutoTokenizer.from_pretrained on that folder would build one that knows almost no words",
            stacklevel=2,
        )

    def write() -> str:
        os.makedirs(directory, exist_ok=True)
        with library_bars():  # transformers' "Writing model shards" only when our bars are on
            clean.save_pretrained(directory)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(directory)
        return os.fspath(directory)

    return write_once(write)


def _materialize_buffers(clean: nn.Module, live: nn.Module) -> None:
    """Copy non-persistent buffers (rotary tables, ...) the meta build left empty from the live model."""
    live_buffers = {unwrapped_name(n): b for n, b in live.named_buffers()}
    for name, buf in list(clean.named_buffers()):
        if buf.device.type != "meta":
            continue
        source = live_buffers.get(name)
        if source is None:
            raise ValueError(f"cannot rebuild buffer {name} of the exported model")
        owner_name, _, attr = name.rpartition(".")
        owner = clean.get_submodule(owner_name) if owner_name else clean
        persistent = attr not in owner._non_persistent_buffers_set
        owner.register_buffer(attr, source.detach().clone(), persistent=persistent)
