"""Who owns which tensors of a model: the declarations every generic walker reads.

A model a method was applied to is a frozen base plus tensors that belong to adapters.
Ownership is *declared*, never guessed from parameter names:

* :func:`declare_trainable` marks parameters of a module as trained by an adapter (or, with
  the default owner :data:`MODULE`, by the model itself: a task head our LightningModules
  add, which trains with whatever adapter trains);
* :func:`declare_state` marks tensors an adapter owns but never trains (a method's fixed
  random projections, say): saved and restored with the adapter, never fingerprinted as
  part of the base, never handed to an optimizer.

Declarations live on modules rather than on tensors, so they survive ``.to()``, DDP
wrapping, FSDP2's parameter swap and 4-bit quantization of the frozen base layers.
:func:`owned_tensors` walks them; every consumer (freezing, optimizers, checkpoints,
exports, fingerprints, 4-bit conversion) reads that one walk.

Modules a method inserts for one adapter derive from :class:`AdapterPart`, which carries
the adapter's name, whether it is on, and which rows of a batch it serves.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

MODULE = ""
"""Owner name of tensors a model declares trainable itself (trained with any adapter)."""
TRAIN = "train"
"""Role of tensors an optimizer updates."""
STATE = "state"
"""Role of tensors an adapter owns but never trains."""
ROLES = (TRAIN, STATE)
EVERYTHING = "*"
"""Declared name meaning every parameter (and persistent buffer) of the module's subtree."""
_ATTR = "_lp_owned"

__all__ = [
    "EVERYTHING",
    "MODULE",
    "ROLES",
    "STATE",
    "TRAIN",
    "AdapterPart",
    "LayerWrapper",
    "OwnedTensor",
    "adapter_parts",
    "declarations",
    "declare_state",
    "declare_trainable",
    "owned_tensors",
    "trains_weight",
    "transfer_declarations",
    "undeclare",
    "unwrapped",
]


class AdapterPart(nn.Module):
    """Base of every module a method inserts for one adapter.

    Generic code switches adapters through these attributes, without knowing the method:

    Attributes:
        adapter_name: The adapter this part belongs to.
        active: Whether the part takes part in ``forward``.
        rows: ``None`` (every row of the batch), or a ``(batch,)`` bool mask of the rows this
            adapter serves, with at least one row (per-row routing, see
            ``lightning_peft.adapter_per_row``).
        merged: Whether the part's update is folded into the base weights (methods that
            merge set it; the others never do).
    """

    def __init__(self, adapter_name: str) -> None:
        super().__init__()
        self.adapter_name = adapter_name
        self.active = True
        self.rows: torch.Tensor | None = None
        self.merged = False

    def serves(self) -> bool:
        """Whether the part contributes to the current forward (routing gives it rows only when it serves some)."""
        return self.active

    def route(self, active: bool, rows: torch.Tensor | None) -> None:
        """Set ``active`` and ``rows`` together (a plain attribute write: called per part on every routing)."""
        if rows is not None and rows.dtype != torch.bool:
            raise TypeError(f"rows must be a bool mask, got {rows.dtype}")
        self.__dict__["active"] = active  # neither is a parameter, buffer or module
        self.__dict__["rows"] = rows


def adapter_parts(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, AdapterPart]]:
    """``(qualified_name, part)`` of every :class:`AdapterPart` in ``model`` (of one adapter if named)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, AdapterPart) and (adapter_name is None or module.adapter_name == adapter_name)
    ]


# --------------------------------------------------------------------------- declarations
def _declare(module: nn.Module, names: Iterable[str] | None, adapter: str, role: str) -> None:
    table: dict[tuple[str, str], set[str]] = dict(getattr(module, _ATTR, {}))
    if names is None:
        chosen = {EVERYTHING}
    else:
        chosen = set(names)
        direct = {n for n, _ in module.named_parameters(recurse=False)}
        if role == STATE:
            direct |= {n for n, _ in module.named_buffers(recurse=False)}
        unknown = chosen - direct
        if unknown:
            raise ValueError(
                f"{type(module).__name__} has no direct tensor(s) {sorted(unknown)}; it has {sorted(direct)}"
            )
    key = (adapter, role)
    table[key] = set(table.get(key, set())) | chosen
    object.__setattr__(module, _ATTR, table)


def declare_trainable(
    module: nn.Module, names: Iterable[str] | None = None, *, adapter: str = MODULE
) -> None:
    """Declare parameters of ``module`` trainable, owned by ``adapter``.

    Args:
        module: The module that owns the parameters.
        names: Names of the module's *direct* parameters (``"weight"``, ``"bias"``);
            ``None`` declares every parameter (and persistent buffer, such as running
            statistics) of the module and of all its submodules.
        adapter: The owning adapter; :data:`MODULE` (the default) for tensors the model
            itself trains with every adapter.

    Raises:
        ValueError: If a name is not a direct parameter of ``module``.
    """
    _declare(module, names, adapter, TRAIN)


def declare_state(module: nn.Module, names: Iterable[str] | None = None, *, adapter: str) -> None:
    """Declare tensors of ``module`` as ``adapter``'s own frozen state (saved with it, never trained).

    Args:
        module: The module holding the tensors.
        names: Direct parameters or buffers of ``module``; ``None`` for its whole subtree.
        adapter: The owning adapter.
    """
    _declare(module, names, adapter, STATE)


def declarations(module: nn.Module) -> dict[tuple[str, str], set[str]]:
    """The declarations made on ``module`` itself: ``{(adapter, role): names}`` (a copy)."""
    return {key: set(names) for key, names in getattr(module, _ATTR, {}).items()}


def trains_weight(module: nn.Module) -> bool:
    """Whether some owner declared ``module``'s own ``weight`` (or the whole module) trainable.

    Such a layer trains as it is (a task head, a ``modules_to_save`` copy): methods that
    adapt frozen layers (``target_modules="all-linear"``) leave it alone.
    """
    return any(
        role == TRAIN and (EVERYTHING in names or "weight" in names)
        for (_, role), names in getattr(module, _ATTR, {}).items()
    )


def transfer_declarations(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` (a module replacing ``source``, e.g. its 4-bit version) ``source``'s declarations."""
    table = getattr(source, _ATTR, None)
    if table:
        object.__setattr__(target, _ATTR, {key: set(names) for key, names in table.items()})


def undeclare(module: nn.Module, adapter: str | None = None, role: str | None = None) -> None:
    """Remove declarations made on ``module`` itself: all, one adapter's, or one adapter's in one role."""
    table = getattr(module, _ATTR, None)
    if table is None:
        return
    kept = {
        key: names
        for key, names in table.items()
        if adapter is not None and not (key[0] == adapter and (role is None or key[1] == role))
    }
    if kept:
        object.__setattr__(module, _ATTR, kept)
    else:
        object.__delattr__(module, _ATTR)


# --------------------------------------------------------------------------- the walk
@dataclass(frozen=True)
class OwnedTensor:
    """One tensor a declaration covers."""

    name: str
    """Qualified name under the walked model."""
    tensor: torch.Tensor
    """The parameter or buffer itself."""
    adapter: str
    """Its owner (:data:`MODULE` for the model's own trainable tensors)."""
    role: str
    """:data:`TRAIN` or :data:`STATE`."""
    is_parameter: bool
    """A parameter (``False``: a persistent buffer)."""


def owned_tensors(model: nn.Module, adapters: Collection[str] | None = None) -> Iterator[OwnedTensor]:
    """Every declared tensor of ``model``, in module order, shared tensors once.

    The innermost declaration decides a tensor's owner: a name declared on the module that
    holds it beats an ``EVERYTHING`` declaration on an ancestor. Persistent buffers count only
    where a whole subtree is declared (``names=None``) or where :func:`declare_state` names them.

    Args:
        model: The model to walk.
        adapters: Only tensors owned by these adapters (tensors of :data:`MODULE` are
            always included); ``None`` for every owner.
    """
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str, inherited: tuple[str, str] | None) -> Iterator[OwnedTensor]:
        # an adapter's declaration beats the model's own (MODULE) one on the same module
        table = sorted(getattr(module, _ATTR, {}).items(), key=lambda item: item[0][0] != MODULE)
        everything = next((key for key, names in reversed(table) if EVERYTHING in names), None)
        scope = everything or inherited
        explicit = {n: key for key, names in table for n in names if n != EVERYTHING}
        tensors = [(n, p, True) for n, p in module.named_parameters(recurse=False)]
        tensors += [
            (n, b, False)
            for n, b in module.named_buffers(recurse=False)
            if b is not None and n not in module._non_persistent_buffers_set
        ]
        for name, tensor, is_param in tensors:
            key = explicit.get(name) or scope
            if key is None or id(tensor) in seen:
                continue
            adapter, role = key
            seen.add(id(tensor))
            if adapters is None or adapter == MODULE or adapter in adapters:
                yield OwnedTensor(prefix + name, tensor, adapter, role, is_param)
        for child_name, child in module.named_children():
            yield from visit(child, f"{prefix}{child_name}.", scope)

    yield from visit(model, "", None)


class LayerWrapper(nn.Module):
    """Base of a module a method puts in place of a layer, keeping the layer as ``base_layer``.

    Targeting treats a wrapper as the layer it wraps (a second adapter finds the same
    layers), and exports unwrap it. Attributes the rest of the model reads from the layer
    (``weight``, ``in_features``, ``nf``...) are forwarded to ``base_layer``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def innermost(self) -> nn.Module:
        """The layer under every wrapper."""
        layer = self.base_layer
        while isinstance(layer, LayerWrapper):
            layer = layer.base_layer
        return layer

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(super().__getattr__("base_layer"), name)


def unwrapped(module: nn.Module) -> nn.Module:
    """``module`` itself, or the layer under every :class:`LayerWrapper` if it is one."""
    return module.innermost() if isinstance(module, LayerWrapper) else module
