"""Which modules a method touches: names, regular expressions, ``"all-linear"``, heads, blocks.

Everything here reads model structure (types, module tree, Hugging Face accessors); no
method-specific logic lives here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

try:  # transformers' GPT-2 style linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)
"""Layer types that linear-layer methods (LoRA, 4-bit quantization) know how to handle."""

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler_head")


def find_backbone(model: nn.Module) -> nn.Module:
    """Return the top-most Hugging Face ``PreTrainedModel`` inside ``model`` (or ``model``)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return model


def backbone_prefix(model: nn.Module) -> str:
    """The qualified name of :func:`find_backbone` inside ``model`` plus a dot (or ``""``)."""
    backbone = find_backbone(model)
    for name, module in model.named_modules():
        if module is backbone:
            return f"{name}." if name else ""
    return ""


def head_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the task head(s): ``lm_head`` / output embeddings, ``classifier``, ``score``.

    For a causal LM the head is the output embedding layer (``get_output_embeddings()``);
    for a sequence classifier it is the ``classifier`` or ``score`` submodule of the
    top-most Hugging Face model. Any model family works since only these accessors and
    attribute names are read.
    """
    backbone = find_backbone(model)
    prefix = backbone_prefix(model)
    names: list[str] = []
    get_out = getattr(backbone, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    by_id = {id(m): n for n, m in model.named_modules()}
    if out is not None and id(out) in by_id:
        names.append(by_id[id(out)])
    for attr in HEAD_NAMES:
        child = getattr(backbone, attr, None)
        if isinstance(child, nn.Module) and id(child) in by_id and by_id[id(child)] not in names:
            if attr == "cls" and out is not None:
                continue  # BERT's MLM head wraps the output embeddings already listed
            names.append(prefix + attr)
    return names


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(name, blocks)``: the repeated transformer block list of ``model``.

    It is the longest ``nn.ModuleList`` whose items all share one class (``model.layers``
    in Llama, ``transformer.h`` in GPT-2, ``encoder.layer`` in BERT, ...).

    Raises:
        ValueError: If the model has no such list.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError(
            f"could not find a list of repeated transformer blocks in {type(model).__name__}; "
            "expected an nn.ModuleList of identical blocks (e.g. model.layers, transformer.h, encoder.layer)"
        )
    return best


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_kinds(model: nn.Module, types: tuple[type[nn.Module], ...] = LINEAR_TYPES) -> list[str]:
    """Distinct last-component names of the layers of ``types`` in ``model`` (for messages)."""
    kinds = []
    for name, module in model.named_modules():
        if isinstance(module, types):
            last = name.rsplit(".", 1)[-1]
            if last not in kinds:
                kinds.append(last)
    return kinds


def select_modules(
    model: nn.Module,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None = None,
    *,
    types: tuple[type[nn.Module], ...] = LINEAR_TYPES,
    skip: Iterable[type[nn.Module]] = (),
) -> list[tuple[str, nn.Module]]:
    """Select the modules a method adapts.

    Args:
        model: The model to search.
        targets: ``"all-linear"`` (every layer of ``types`` except the output head), a
            regular expression matched against the full qualified name, or a list of names
            each matching a full name or its trailing components (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``).
        exclude: Same forms as ``targets`` (except ``"all-linear"``); removes matches.
        types: Layer types that may be adapted.
        skip: Module types whose subtrees are never searched (e.g. already-adapted wrappers).

    Returns:
        ``(qualified_name, module)`` pairs in module order.

    Raises:
        ValueError: If nothing matches (the message lists the layer names that exist), or a
            matched module has a type the method cannot adapt.
    """
    skip = tuple(skip)
    heads = set(head_module_names(model)) if targets == "all-linear" else set()
    skipped_prefixes: list[str] = []
    chosen: list[tuple[str, nn.Module]] = []
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skipped_prefixes):
            continue
        if skip and isinstance(module, skip):
            skipped_prefixes.append(name + ".")
            if not (targets != "all-linear" and _matches(name, targets)):
                continue
            chosen.append((name, module))  # already adapted: caller decides (idempotency)
            continue
        if targets == "all-linear":
            hit = isinstance(module, types) and name not in heads
        else:
            hit = _matches(name, targets)
        if hit and exclude is not None and _matches(name, exclude):
            hit = False
        if not hit:
            continue
        if not isinstance(module, types):
            if any(isinstance(m, types) for m in module.children()):
                continue  # a container whose name matched, e.g. "attn" in a regex; its layers decide
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        chosen.append((name, module))
    if unsupported:
        allowed = ", ".join(t.__name__ for t in types)
        raise ValueError(
            f"target_modules matched layer(s) of a type this method cannot adapt: {unsupported}; "
            f"supported types: {allowed}. Narrow target_modules or add them to exclude_modules."
        )
    if not chosen:
        raise ValueError(
            f"target_modules={targets!r} matched no layer of {type(model).__name__}. "
            f"Linear layers that exist: {', '.join(layer_kinds(model, types)) or 'none'}"
        )
    return chosen


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Return ``(parent, attribute)`` such that ``getattr(parent, attribute)`` is ``name``."""
    if "." in name:
        parent_name, attr = name.rsplit(".", 1)
        return model.get_submodule(parent_name), attr
    return model, name


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` by ``new``."""
    parent, attr = get_submodule_parent(model, name)
    setattr(parent, attr, new)
