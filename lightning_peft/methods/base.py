"""The contract every fine-tuning method meets, and the registry of methods.

A method is a small dataclass (its configuration) with an :meth:`Method.apply` that freezes
what the method freezes and inserts what it adds. Trainability is *declared*, never guessed
from parameter names: a module that owns trainable parameters says so with
:func:`declare_trainable` (modules a method adds do it in their constructor), and
:func:`sync_requires_grad` makes ``requires_grad`` follow those declarations. Freezing,
optimizers, checkpoints and exports all read the same declaration through
:func:`trainable_named_parameters`.

The declaration lives on modules rather than on tensors, so it survives ``.to()``, DDP
wrapping, FSDP2's parameter swap and 4-bit quantization of the (frozen) base layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

_TRAINABLE_ATTR = "_lp_trainable"
_METHODS_ATTR = "_lp_methods"
_ALL = "*"

REGISTRY: dict[str, type[Method]] = {}


# --------------------------------------------------------------------------- declarations
def declare_trainable(module: nn.Module, names: Iterable[str] | None = None) -> None:
    """Declare parameters of ``module`` as trainable.

    Args:
        module: The module that owns the parameters.
        names: Names of the module's *direct* parameters (``"weight"``, ``"bias"``, ...).
            ``None`` declares every parameter of the module and of all its submodules.
    """
    current = getattr(module, _TRAINABLE_ATTR, set())
    if names is None:
        current = {_ALL}
    else:
        names = set(names)
        direct = {n for n, _ in module.named_parameters(recurse=False)}
        unknown = names - direct
        if unknown:
            raise ValueError(
                f"{type(module).__name__} has no direct parameter(s) {sorted(unknown)}; "
                f"it has {sorted(direct)}"
            )
        current = set(current) | names
    object.__setattr__(module, _TRAINABLE_ATTR, current)


def undeclare_trainable(module: nn.Module) -> None:
    """Remove every trainability declaration made on ``module`` itself."""
    if hasattr(module, _TRAINABLE_ATTR):
        object.__delattr__(module, _TRAINABLE_ATTR)


def _declared(module: nn.Module) -> set[str]:
    return getattr(module, _TRAINABLE_ATTR, set())


def trainable_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(qualified_name, parameter)`` for every declared-trainable parameter.

    Shared parameters (tied weights) are yielded once, under their first name.
    """
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str, inherited: bool) -> Iterator[tuple[str, nn.Parameter]]:
        declared = _declared(module)
        everything = inherited or _ALL in declared
        for name, param in module.named_parameters(recurse=False):
            if (everything or name in declared) and id(param) not in seen:
                seen.add(id(param))
                yield prefix + name, param
        for child_name, child in module.named_children():
            yield from visit(child, f"{prefix}{child_name}.", everything)

    yield from visit(model, "", False)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the declared-trainable parameters of ``model``, in module order."""
    return [name for name, _ in trainable_named_parameters(model)]


def sync_requires_grad(model: nn.Module) -> None:
    """Set ``requires_grad`` to ``True`` exactly for declared parameters, ``False`` elsewhere."""
    trainable = {id(p) for _, p in trainable_named_parameters(model)}
    for param in model.parameters():
        want = id(param) in trainable
        if param.requires_grad != want:
            param.requires_grad_(want)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts, counting shared tensors once.

    4-bit parameters count as the number of weights they stand for, not packed bytes.
    """
    seen: set[int] = set()
    trainable = total = 0
    trainable_ids = {id(p) for _, p in trainable_named_parameters(model)}
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        state = getattr(param, "quant_state", None)
        n = int(torch.Size(state.shape).numel()) if state is not None else param.numel()
        total += n
        if id(param) in trainable_ids:
            trainable += n
    return trainable, total


# --------------------------------------------------------------------------- methods
@dataclasses.dataclass
class Method:
    """Base of every method configuration.

    Subclasses are dataclasses whose fields are the method's hyperparameters; they validate
    in ``__post_init__``, implement :meth:`_apply`, and register themselves with
    :func:`register`.
    """

    name: ClassVar[str] = "method"

    # -- to implement -----------------------------------------------------------------
    def _apply(self, model: nn.Module) -> None:
        """Insert the method's modules and declare what trains (no freezing needed)."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> None:
        """Fold the method's deltas into the base weights (only methods that can)."""

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge`."""

    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """Return ``(adapter_config, adapter_state_dict)`` in Hugging Face PEFT's format.

        ``None`` when PEFT has no equivalent of this method. Names in the state dict are
        relative to the Hugging Face model (``base_model.model.`` is added by the exporter).
        """
        return None

    def from_peft(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a PEFT adapter state dict onto this method's parameter names in ``model``."""
        raise NotImplementedError(f"{self.name} has no Hugging Face PEFT counterpart")

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> Method:
        """Build this method's config from a PEFT ``adapter_config.json`` dict."""
        raise NotImplementedError(f"{cls.name} has no Hugging Face PEFT counterpart")

    # -- shared behaviour -------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Apply the method to ``model`` in place and return it.

        Everything not declared trainable is frozen. Applying the same configuration again
        is a no-op; the same method with another configuration raises ``ValueError`` rather
        than wrapping layers twice.

        Args:
            model: Any ``nn.Module`` (a LightningModule, a Hugging Face model, a model on
                the ``meta`` device, ...).

        Returns:
            The same ``model``.
        """
        existing = applied_methods(model)
        same = [m for m in existing if m.name == self.name]
        if same:
            if same[0].to_dict() == self.to_dict():
                return model  # same method, same configuration: already there
            raise ValueError(
                f"{self.name} is already applied to this model as {same[0].to_dict()}; "
                f"cannot apply it again as {self.to_dict()}. Build a fresh model to change it."
            )
        self._apply(model)
        object.__setattr__(model, _METHODS_ATTR, [*existing, self.config()])
        sync_requires_grad(model)
        return model

    def config(self) -> Method:
        """A plain copy of this configuration (a callback subclass returns its config class)."""
        cls = REGISTRY.get(self.name)
        if cls is None or type(self) is cls:
            return self
        return method_from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description: ``{"method": name, **fields}``."""
        out: dict[str, Any] = {"method": self.name}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to :data:`REGISTRY` under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls
    return cls


def method_from_dict(data: dict[str, Any]) -> Method:
    """Rebuild a method config from :meth:`Method.to_dict` output.

    Only registered method classes can be built; nothing named in ``data`` is imported or
    executed.
    """
    data = dict(data)
    name = data.pop("method", None)
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{name} has no option(s) {sorted(unknown)}; options: {sorted(known)}")
    return cls(**data)


def applied_methods(model: nn.Module) -> list[Method]:
    """Methods applied to ``model`` or, if none at its root, to its top-most submodule that has any."""
    methods = getattr(model, _METHODS_ATTR, None)
    if methods is not None:
        return list(methods)
    for module in model.modules():
        methods = getattr(module, _METHODS_ATTR, None)
        if methods is not None:
            return list(methods)
    return []


def set_applied_methods(model: nn.Module, methods: list[Method]) -> None:
    """Record ``methods`` as applied to ``model`` (used when modules are rebuilt elsewhere)."""
    object.__setattr__(model, _METHODS_ATTR, list(methods))
