r"""Which modules a method touches: names, regular expressions, ``"all-linear"``, heads, blocks.

Everything here reads model structure (types, the module tree, Hugging Face accessors); no
method-specific logic lives here. Names are matched *relative to the Hugging Face model*
inside the object a method is applied to, so ``target_modules`` means the same layers
whether a method is applied to ``AutoModelForCausalLM`` itself or, through a callback, to
a LightningModule holding it as ``backbone``: a PEFT-style anchored regex such as
``model\.layers\.\d+\.self_attn\.(q|v)_proj`` works in both.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedModel

from .layers import LINEAR_TYPES
from .ownership import LayerWrapper, trains_weight, unwrapped

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler_head")
"""Attribute names of task heads on Hugging Face models."""

__all__ = [
    "HEAD_NAMES",
    "backbone_prefix",
    "find_backbone",
    "find_block_list",
    "head_module_names",
    "layer_kinds",
    "linear_layers",
    "matches",
    "replace_module",
    "require_matches",
    "select_modules",
    "suggest_names",
]


def find_backbone(model: nn.Module) -> nn.Module:
    """Return the top-most Hugging Face ``PreTrainedModel`` inside ``model`` (or ``model``)."""
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


def matches(name: str, target: str) -> bool:
    """Whether a list entry names module ``name``: the full name, or its trailing components."""
    return name == target or name.endswith("." + target)


def _hit(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(matches(name, t) for t in targets)


def linear_layers(
    model: nn.Module, types: tuple[type[nn.Module], ...] = LINEAR_TYPES
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the linear layers of ``model``, a wrapper standing for the layer it wraps.

    The subtree of a :class:`~lightning_peft.core.ownership.LayerWrapper` is not entered, so
    a layer another method already wrapped is listed once, under its own name.
    """
    out: list[tuple[str, nn.Module]] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if name and any(name.startswith(p) for p in covered):
            continue
        if isinstance(module, LayerWrapper):
            covered.append(name + ".")
        if isinstance(unwrapped(module), types):
            out.append((name, module))
    return out


def layer_kinds(model: nn.Module, types: tuple[type[nn.Module], ...] = LINEAR_TYPES) -> list[str]:
    """Distinct last-component names of the layers of ``types`` in ``model`` (for messages)."""
    kinds = []
    for name, _ in linear_layers(model, types):
        last = name.rsplit(".", 1)[-1]
        if last and not last.isdigit() and last not in kinds:  # "0", "1": list positions say nothing
            kinds.append(last)
    return kinds


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def suggest_names(entry: str, names: list[str]) -> str:
    """``"; did you mean 'x', 'y'?"`` with the names (or their last components) closest to ``entry``, else ``"."``."""
    pool = sorted({n.rsplit(".", 1)[-1] for n in names} | set(names))
    close = difflib.get_close_matches(entry, pool, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."


def require_matches(model: nn.Module, entries: Sequence[str], argument: str) -> None:
    """Refuse list entries that name no module of ``model`` (full names or trailing components).

    An entry may name a module relative to the Hugging Face model inside ``model`` (as in
    :func:`select_modules`) or relative to ``model`` itself.

    Raises:
        ValueError: Naming the first such entry and the closest existing names.
    """
    prefix = backbone_prefix(model)
    full = [n for n, _ in model.named_modules() if n]
    names = [_relative(n, prefix) for n in full]
    for entry in entries:
        if not any(matches(n, entry) for n in names + full):
            raise ValueError(
                f"{argument} entry {entry!r} matches no module of {type(model).__name__}"
                f"{suggest_names(entry, names)} Layers that exist: {', '.join(layer_kinds(model)) or 'none'}"
            )


def select_modules(
    model: nn.Module,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None = None,
    *,
    types: tuple[type[nn.Module], ...] = LINEAR_TYPES,
    what: str = "target_modules",
) -> list[tuple[str, nn.Module]]:
    """Select the modules a method adapts.

    A :class:`~lightning_peft.core.ownership.LayerWrapper` counts as the layer it wraps and
    is returned itself (a second adapter on the same layer finds the wrapper); its subtree is
    not searched.

    Args:
        model: The model to search.
        targets: ``"all-linear"`` (every layer of ``types`` except the output head and layers
            that already train whole, such as a module's own task heads), a
            regular expression fully matched against names relative to the Hugging Face
            model, or a list of names each matching a name or its trailing components
            (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``). Every list entry
            must match at least one layer.
        exclude: Same forms as ``targets`` (except ``"all-linear"``); removes matches.
        types: Layer types that may be adapted.
        what: The argument's name, for messages.

    Returns:
        ``(qualified_name, module)`` pairs in module order (names relative to ``model``).

    Raises:
        ValueError: If nothing matches or a list entry matches nothing (the message names
            the entry and suggests existing names), or a matched module has a type the
            method cannot adapt.
    """
    prefix = backbone_prefix(model)
    heads = set(head_module_names(model)) if targets == "all-linear" else set()
    covered: list[str] = []
    chosen: list[tuple[str, nn.Module]] = []
    unsupported: list[str] = []
    seen_names: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in covered):
            continue
        if isinstance(module, LayerWrapper):
            covered.append(name + ".")
        relative = _relative(name, prefix)
        seen_names.append(relative)
        layer = unwrapped(module)
        if targets == "all-linear":
            hit = isinstance(layer, types) and name not in heads and not trains_weight(layer)
        else:
            hit = _hit(relative, targets)
        if hit and exclude is not None and _hit(relative, exclude):
            hit = False
        if not hit:
            continue
        if not isinstance(layer, types):
            if any(isinstance(unwrapped(m), types) for m in module.modules() if m is not module):
                continue  # a container whose name matched, e.g. "attn" in a regex: its layers decide
            unsupported.append(f"{relative} ({type(module).__name__})")
            continue
        chosen.append((name, module))
    if unsupported:
        allowed = ", ".join(t.__name__ for t in types)
        raise ValueError(
            f"{what} matched module(s) of a type this method cannot adapt: {unsupported}; "
            f"supported types: {allowed}. Narrow {what} or add them to exclude_modules."
        )
    for argument, entries in ((what, targets), ("exclude_modules", exclude)):
        if entries is None or isinstance(entries, str):
            continue
        for entry in entries:
            if not any(matches(n, entry) for n in seen_names):
                raise ValueError(
                    f"{argument} entry {entry!r} matches no module of {type(model).__name__}"
                    f"{suggest_names(entry, seen_names)} Layers that exist: {', '.join(layer_kinds(model, types)) or 'none'}"
                )
    if not chosen:
        raise ValueError(
            f"{what}={targets!r} matched no layer of {type(model).__name__}. "
            f"Layers that exist: {', '.join(layer_kinds(model, types)) or 'none'}"
        )
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` by ``new``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
