"""How a sequence classifier turns its last hidden states into the one vector its head reads.

``"cls"`` is the model's own rule, whatever it is (BERT: the ``[CLS]`` state through its
pooler; RoBERTa: the ``<s>`` state; Llama, GPT-2: the last non-pad token). ``"mean"`` is the
masked mean of the last hidden states over the tokens the user's attention mask keeps (how
sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained); ``"last"`` is the
state of the last token the mask keeps.

:func:`use_pooling` gives a Hugging Face ``*ForSequenceClassification`` model a forward that
runs its base model, pools, and applies the model's own dropout and head. It is set on the
model itself, so everything hooked on the model runs as before (FSDP2 units, the methods'
hooks: prompt tuning's virtual tokens are cut from the base model's output before pooling,
so the mean covers exactly the user's tokens). The base model's own pooler, unused then, is
removed where the model family allows it (BERT), so no parameter sits idle.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .layers import LINEAR_TYPES
from .ownership import unwrapped
from .targeting import find_backbone

POOLINGS = ("cls", "mean", "last")
"""The pooling choices."""
HEADS = ("classifier", "score")

__all__ = [
    "HEADS",
    "POOLINGS",
    "PooledForward",
    "check_pooling",
    "pool",
    "pooling_of",
    "refuse_pooled_export",
    "use_pooling",
]


def check_pooling(pooling: str) -> str:
    """``pooling`` itself if it is one of :data:`POOLINGS`.

    Raises:
        ValueError: Naming the choices.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    return pooling


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Pool ``hidden`` (B, T, H) over the positions ``mask`` (B, T) keeps: ``"mean"`` or ``"last"``.

    Returns:
        (B, H).
    """
    if mask is None:
        mask = hidden.new_ones(hidden.shape[:2])
    keep = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if pooling == "mean":
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1.0)  # (B, H)
    if pooling == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)  # (T,)
        last = (mask.to(torch.long) * (positions + 1)).argmax(
            -1
        )  # (B,): the last kept position, either padding side
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    raise ValueError(f"pool() takes 'mean' or 'last', got {pooling!r}")


def _head(model: nn.Module) -> tuple[str, nn.Module]:
    for name in HEADS:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return name, head
    raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head to pool for")


def use_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """Make the sequence classifier ``model`` pool its last hidden states as ``pooling`` says (in place).

    ``"cls"`` leaves the model as it is. ``"mean"`` and ``"last"`` need a model whose head is
    its ``classifier`` / ``score`` alone (a linear layer, or a RoBERTa-style head reading the
    first position of the features it gets), after the model's own dropout.

    Raises:
        ValueError: For an unknown pooling, or a model with other layers between its base
            model and its head (DistilBERT's ``pre_classifier``, DeBERTa's ``pooler``):
            ``"cls"`` works for those.
    """
    check_pooling(pooling)
    if pooling == "cls":
        return model
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(
            f"pooling={pooling!r} needs a Hugging Face *ForSequenceClassification model, got {type(model).__name__}"
        )
    head_name, _ = _head(model)
    extra = [
        name
        for name, child in model.named_children()
        if child is not base and name != head_name and any(True for _ in child.parameters())
    ]
    if extra:
        raise ValueError(
            f"pooling={pooling!r}: {type(model).__name__} has layers between its base model and its head ({extra}), "
            "which a pooled vector would skip; use pooling='cls' for this model"
        )
    pooler = getattr(base, "pooler", None)
    if (
        isinstance(pooler, nn.Module)
        and "add_pooling_layer" in inspect.signature(type(base).__init__).parameters
    ):
        base.pooler = None  # the model family runs without it (BERT); it would only sit idle
    model.forward = PooledForward(model, pooling, head_name)
    return model


def pooling_of(model: nn.Module) -> str:
    """The pooling :func:`use_pooling` gave ``model`` (``"cls"``: its own rule)."""
    forward = model.__dict__.get("forward")
    return forward.pooling if isinstance(forward, PooledForward) else "cls"


def refuse_pooled_export(model: nn.Module, action: str) -> None:
    """Refuse exporting a classifier that pools otherwise than its plain Hugging Face class would.

    A merged or PEFT export is loaded into a plain ``AutoModelForSequenceClassification``,
    whose forward always reads its own head input (BERT's pooled ``[CLS]``): the exported
    model would answer with other logits.

    Raises:
        ValueError: One line naming what works instead.
    """
    pooling = pooling_of(find_backbone(model))
    if pooling != "cls":
        raise ValueError(
            f"{action}: this classifier reads pooling={pooling!r}, which a plain {type(find_backbone(model)).__name__} "
            "cannot do (it reads its own [CLS] or last-token input), so the export would give other logits; save the "
            f"delta instead (lightning_peft.save_delta, lightning-peft export --format delta) and load it into "
            f"SequenceClassifier(..., pooling={pooling!r}), or train with pooling='cls'"
        )


class PooledForward:
    """The forward :func:`use_pooling` gives a sequence classifier: base model, pool, dropout, head, loss.

    Takes the model's keyword arguments (``input_ids``, ``attention_mask``, ``labels``, ...);
    the loss follows ``config.problem_type`` as the model's own forward does.
    """

    def __init__(self, model: nn.Module, pooling: str, head_name: str) -> None:
        self.model = model
        self.pooling = pooling
        self.head_name = head_name

    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Classify: (B, T) inputs to (B, num_labels) logits, plus the loss when ``labels`` are given."""
        model = self.model
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out[0]  # (B, T, H) last hidden states: virtual tokens (prompt tuning) already cut
        pooled = pool(hidden, attention_mask, self.pooling)  # (B, H)
        head = getattr(model, self.head_name)
        if isinstance(unwrapped(head), LINEAR_TYPES):
            dropout = getattr(model, "dropout", None)
            logits = head(dropout(pooled) if isinstance(dropout, nn.Dropout) else pooled)  # (B, labels)
        else:  # a head that reads the first position of the features (RoBERTa's)
            logits = head(pooled.unsqueeze(1))  # (B, labels)
        loss = None if labels is None else _loss(model.config, logits, labels)
        output = SequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )
        return output if return_dict is not False else output.to_tuple()


def _loss(config: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss Hugging Face sequence classifiers compute, by ``config.problem_type``."""
    num_labels = logits.shape[-1]
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(logits.shape[:-1]))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
