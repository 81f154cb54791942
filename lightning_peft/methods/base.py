"""The method contract, the registry of methods, and the record of the adapters on a model.

A method is one file in this package: a dataclass whose fields are its hyperparameters,
decorated with :func:`register`. Everything generic code needs from it is a hook below,
with a default, so no generic module ever asks which method it is dealing with.

=======================  ========================================  ==================================
hook                     what generic code uses it for             default
=======================  ========================================  ==================================
``inject(model)``        insert modules and declare what trains    required
``keep_full_precision``  layers ``FourBitPrecision`` must not      none: every frozen linear layer no
                         quantize                                  adapter owns may be quantized
``merge``/``unmerge``/   ``lightning_peft.merge``, ``save_delta``  ``merge`` raises :class:`MethodError`
``is_merged``            refusing merged models                    naming the formats that work
``folded_layers``        ``export_merged``: plain weights of the   raises :class:`MethodError`
                         layers the method wraps, deltas folded
``to_peft``/             ``export_peft``/``import_peft``           "no PEFT equivalent"
``from_peft``/
``from_peft_config``
``remove(model)``        ``delete_adapter``                        "cannot be deleted"
``check_routable``       ``adapter_per_row``                       "not supported for this method"
``combine`` (class)      ``add_weighted_adapter``                  "cannot be combined"
``starts_as_base``,      what the conformance tests expect          ``True``, ``{}``
``example``
=======================  ========================================  ==================================

Trainability and ownership are *declared* on modules (:mod:`lightning_peft.core.ownership`)
under the instance's ``adapter_name``; one model can carry several adapters, each a method
config recorded in the model's :class:`AdapterRecord`. The record says which adapters run
in ``forward`` (``active``) and which ones an optimizer updates (``trainable``).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import inspect
import pkgutil
import re
import textwrap
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.ownership import MODULE, TRAIN, adapter_parts, owned_tensors

REGISTRY: dict[str, type[Method]] = {}
"""Registered methods by :attr:`Method.name` (see :func:`registry`, which also discovers them)."""
ENTRY_POINT_GROUP = "lightning_peft.methods"
"""Entry-point group through which another package registers its own methods."""
_RECORD_ATTR = "_lp_adapters"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
_APPLYING = [0]  # depth of Method.apply calls in progress (read by quantize-on-build)
_DISCOVERED = [False]


class MethodError(ValueError):
    """A method cannot do what was asked of it (merge, a PEFT mapping, per-row routing, ...)."""


# --------------------------------------------------------------------------- the contract
@dataclasses.dataclass
class Method:
    """Base of every method configuration (see the module docstring for the hooks)."""

    name: ClassVar[str] = "method"
    """Registry key, recorded in checkpoints and delta folders."""
    callback_name: ClassVar[str] = ""
    """Name of the Lightning callback built from this config (``lightning_peft.callbacks.<name>``)."""
    peft_types: ClassVar[tuple[str, ...]] = ()
    """Hugging Face PEFT ``peft_type`` values :meth:`from_peft_config` reads."""
    in_place: ClassVar[bool] = False
    """Trains tensors of the base itself (full and partial fine-tuning): always active, cannot be
    switched off, deleted or routed per row."""
    starts_as_base: ClassVar[bool] = True
    """Freshly applied, the model computes exactly what the base computed (``False`` for
    methods that add inputs, such as prompts and prefixes)."""
    example: ClassVar[dict[str, Any]] = {}
    """Options of a small configuration that works on any transformer (the conformance tests
    and the docs use it)."""

    adapter_name: str = dataclasses.field(default="default", kw_only=True)
    """Name of this adapter; a second name adds a second adapter to the same model."""

    def __post_init__(self) -> None:
        if not isinstance(self.adapter_name, str) or not _NAME.fullmatch(self.adapter_name):
            raise ValueError(
                f"adapter_name must be letters, digits, '_' or '-' (starting with a letter or digit), "
                f"e.g. 'default' or 'sentiment'; got {self.adapter_name!r}"
            )

    # -- required ---------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        """Insert this adapter's modules into ``model`` and declare what they own.

        Called by :meth:`apply` under :func:`applying`; modules made here are never
        quantized while a model is being built in 4-bit. Declare ownership with
        ``adapter=self.adapter_name`` (:func:`~lightning_peft.core.ownership.declare_trainable`).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement inject(model)")

    # -- hooks with defaults ------------------------------------------------------------
    def keep_full_precision(self, model: nn.Module) -> list[str]:
        """Names of frozen layers ``FourBitPrecision`` must keep in full precision around this adapter."""
        return []

    def merge(self, model: nn.Module) -> None:
        """Fold this adapter into the base weights (in place).

        Raises:
            MethodError: If the method cannot merge (the default).
        """
        raise MethodError(self._cannot("be merged into the base weights", "save_delta / a delta checkpoint"))

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge` (nothing to do by default)."""

    def is_merged(self, model: nn.Module) -> bool:
        """Whether this adapter is currently folded into the base weights (any of its parts' ``merged``)."""
        return any(part.merged for _, part in adapter_parts(model, self.adapter_name))

    def folded_layers(self, model: nn.Module, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        """Plain tensors of every layer this adapter wraps, the active adapters folded in.

        Returns:
            ``{qualified layer name: {"weight": (out, in) tensor, "bias": ...}}`` with names
            relative to ``model``; the exporter writes them where the plain model keeps
            that layer's tensors.

        Raises:
            MethodError: If the method has nothing a plain model could hold (the default).
        """
        raise MethodError(
            self._cannot("be folded into a plain model", "save_delta, export_peft where mapped")
        )

    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(adapter_config, state_dict)`` of this adapter in Hugging Face PEFT's format.

        State dict names are relative to the Hugging Face model, without PEFT's
        ``base_model.model.`` prefix and without adapter names.

        Raises:
            MethodError: If PEFT has no equivalent (the default).
        """
        raise MethodError(self._cannot("be written in the Hugging Face PEFT format (PEFT has no equivalent)",
                                       "save_delta / a delta checkpoint"))  # fmt: skip

    def from_peft(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a PEFT adapter state dict onto this adapter's tensor names in ``model``."""
        raise MethodError(f"{self.name} has no Hugging Face PEFT counterpart")

    @classmethod
    def from_peft_config(cls, config: dict[str, Any], adapter_name: str = "default") -> Method:
        """Build this method's config from a PEFT ``adapter_config.json`` dict."""
        raise MethodError(f"{cls.name} has no Hugging Face PEFT counterpart")

    def remove(self, model: nn.Module) -> None:
        """Take this adapter's modules out of ``model``, leaving it as if it was never added."""
        raise MethodError(self._cannot("be deleted from a model", "build the model again without it"))

    def check_routable(self, model: nn.Module, adapters: list[Method]) -> None:
        """Raise :class:`MethodError` unless rows of one batch can use different adapters of this method.

        Args:
            model: The model.
            adapters: Every adapter of this method taking part in the routing.
        """
        raise MethodError(
            f"{self.name} does not support a different adapter per row of a batch (adapter {self.adapter_name!r})"
        )

    @classmethod
    def combine(
        cls,
        model: nn.Module,
        sources: list[Method],
        weights: list[float],
        name: str,
        combination: str,
        *,
        rank: int | None,
        density: float,
        seed: int,
    ) -> None:
        """Add adapter ``name`` combining ``sources`` (adapters of this method) with ``weights``.

        Used by ``lightning_peft.add_weighted_adapter``, which checks the arguments and keeps
        the new adapter inactive afterwards.

        Raises:
            MethodError: If the method cannot combine adapters (the default).
        """
        raise MethodError(
            f"{cls.callback_name or cls.name} adapters cannot be combined; add_weighted_adapter supports LoRA"
        )

    def _cannot(self, what: str, instead: str) -> str:
        return (
            f"{self.callback_name or self.name} (adapter {self.adapter_name!r}) cannot {what}; use {instead}"
        )

    # -- shared behaviour -----------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Apply this method to ``model`` in place, as adapter :attr:`adapter_name`, and return it.

        Everything no adapter declares trainable is frozen. The new adapter becomes the
        trainable one and is active together with any adapters the user activated with
        ``lightning_peft.set_adapter``; other adapters stay on the model, frozen and off.
        Applying the same configuration under the same name again is a no-op; another
        method under the same name joins that adapter (the two train together).

        Args:
            model: Any ``nn.Module`` (a LightningModule, a Hugging Face model, a model on
                the ``meta`` device, ...).

        Returns:
            The same ``model``.

        Raises:
            ValueError: If the name already carries this method with another configuration.
        """
        record = find_record(model)
        config = self.config()
        existing = record.find(config) if record is not None else None
        if existing is not None:
            if existing.to_dict() == config.to_dict():
                return model
            raise ValueError(
                f"an adapter named {config.adapter_name!r} is already on this model with {existing.to_dict()}; "
                f"give this one another adapter_name, or remove the old one with "
                f"lightning_peft.delete_adapter(model, {config.adapter_name!r})"
            )
        if record is None:
            record = AdapterRecord()
            object.__setattr__(model, _RECORD_ATTR, record)
        with applying():
            config.inject(model)
        record.add(config)
        sync_adapters(model)
        return model

    def config(self) -> Method:
        """A plain copy of this configuration (a callback returns its config class)."""
        cls = REGISTRY.get(self.name)
        if cls is None or type(self) is cls:
            return self
        return method_from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description: ``{"method": name, **fields}``."""
        out: dict[str, Any] = {"method": self.name}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out


@contextlib.contextmanager
def applying() -> Iterator[None]:
    """Mark that a method is inserting modules (they are never quantized while a model is built)."""
    _APPLYING[0] += 1
    try:
        yield
    finally:
        _APPLYING[0] -= 1


def is_applying() -> bool:
    """Whether a :meth:`Method.apply` is in progress."""
    return _APPLYING[0] > 0


# --------------------------------------------------------------------------- the registry
def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to :data:`REGISTRY` under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        if REGISTRY[cls.name].__qualname__ != cls.__qualname__:
            raise ValueError(f"a method named {cls.name!r} is already registered")
    if not cls.callback_name:
        raise ValueError(f"method {cls.name!r} needs a callback_name (the name of its Lightning callback)")
    REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    """Every registered method, after discovering the built-in ones and those of installed packages.

    Built-in methods are the modules of this package; other packages add theirs through
    the ``lightning_peft.methods`` entry-point group (each entry point names a module whose
    import registers its methods).
    """
    if not _DISCOVERED[0]:
        _DISCOVERED[0] = True
        package = importlib.import_module(__package__)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{__package__}.{info.name}")
        for point in entry_points(group=ENTRY_POINT_GROUP):
            point.load()
    return REGISTRY


def field_docs(cls: type[Method]) -> dict[str, str]:
    """The docstring under each field of a method config (and its bases), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, Method)):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def method_from_dict(data: dict[str, Any]) -> Method:
    """Rebuild a method config from :meth:`Method.to_dict` output (registered names only, nothing imported)."""
    data = dict(data)
    name = data.pop("method", None)
    methods = registry()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(methods)}")
    cls = methods[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{name} has no option(s) {sorted(unknown)}; options: {sorted(known)}")
    return cls(**data)


# --------------------------------------------------------------------------- the record
@dataclasses.dataclass
class AdapterRecord:
    """The adapters on one model, in the order their methods were applied, and which ones run and train.

    An adapter is a name; usually one method config carries it, but several different
    methods may share one name and train together (LoRA on the attention layers plus
    trainable norms, say): they are one adapter.
    """

    configs: list[Method] = dataclasses.field(default_factory=list)
    """Every applied method config, in order."""
    active: list[str] = dataclasses.field(default_factory=list)
    """Adapters used in ``forward``."""
    trainable: list[str] = dataclasses.field(default_factory=list)
    """Adapters an optimizer updates."""
    chosen_active: bool = False
    """Whether the user chose the active adapters (``set_adapter``)."""
    decoupled: bool = False
    """Whether the user chose the trainable adapters apart from the active ones (``set_trainable``)."""

    def names(self) -> list[str]:
        """Adapter names, in the order they were added."""
        return list(dict.fromkeys(c.adapter_name for c in self.configs))

    def of(self, name: str) -> list[Method]:
        """The method configs of adapter ``name``."""
        return [c for c in self.configs if c.adapter_name == name]

    def find(self, config: Method) -> Method | None:
        """The recorded config of the same method under the same adapter name, if any."""
        return next((c for c in self.of(config.adapter_name) if c.name == config.name), None)

    def add(self, config: Method) -> None:
        """Record a method config: its adapter trains, and runs beside the adapters the user activated."""
        name = config.adapter_name
        joins = name in self.names()
        self.configs.append(config)
        if joins and name in self.trainable:
            return
        in_place = {c.adapter_name for c in self.configs if c.in_place}
        kept = [n for n in self.active if (self.chosen_active or n in in_place) and n != name]
        self.active = [*kept, name]
        self.trainable = [name]
        self.decoupled = False

    def remove(self, name: str) -> None:
        """Forget adapter ``name``."""
        self.configs = [c for c in self.configs if c.adapter_name != name]
        self.active = [n for n in self.active if n != name]
        self.trainable = [n for n in self.trainable if n != name]

    def state(self) -> dict[str, Any]:
        """JSON-safe description: method configs in order, active and trainable adapter names."""
        return {
            "adapters": [c.to_dict() for c in self.configs],
            "active": list(self.active),
            "trainable": list(self.trainable),
        }


def find_record(model: nn.Module) -> AdapterRecord | None:
    """The :class:`AdapterRecord` of ``model``, or of its top-most submodule that has one."""
    for module in model.modules():
        record = getattr(module, _RECORD_ATTR, None)
        if record is not None:
            return record
    return None


def replace_config(model: nn.Module, config: Method) -> None:
    """Record ``config`` for its adapter, which a method changed in place (e.g. folding a projection).

    Raises:
        ValueError: If ``model`` has no adapter of that name.
    """
    record = find_record(model)
    existing = record.find(config) if record is not None else None
    if existing is None:
        raise ValueError(f"the model has no {config.name} adapter named {config.adapter_name!r}")
    record.configs[record.configs.index(existing)] = config


def applied_methods(model: nn.Module) -> list[Method]:
    """The method configs of every adapter on ``model``, in the order they were added."""
    record = find_record(model)
    return list(record.configs) if record is not None else []


def sync_adapters(model: nn.Module) -> None:
    """Make every adapter module follow the record (on/off) and ``requires_grad`` follow the trainable set."""
    record = find_record(model)
    if record is not None:
        active = set(record.active)
        for _, part in adapter_parts(model):
            part.active = part.adapter_name in active
    sync_requires_grad(model)


# --------------------------------------------------------------------------- trainable parameters
def trainable_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(qualified_name, parameter)`` of every parameter an optimizer should update, shared ones once.

    Those are the parameters declared trainable by a trainable adapter, and those the model
    declares itself (a task head), which train whenever any adapter does (or when the model
    carries none).
    """
    record = find_record(model)
    trainable = None if record is None else set(record.trainable)
    for owned in owned_tensors(model):
        if owned.role != TRAIN or not owned.is_parameter:
            continue
        if owned.adapter == MODULE:
            if trainable is None or trainable:
                yield owned.name, owned.tensor
        elif trainable is not None and owned.adapter in trainable:
            yield owned.name, owned.tensor


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of :func:`trainable_named_parameters`, in module order."""
    return [name for name, _ in trainable_named_parameters(model)]


def sync_requires_grad(model: nn.Module) -> None:
    """Set ``requires_grad`` to ``True`` exactly for :func:`trainable_named_parameters`."""
    trainable = {id(p) for _, p in trainable_named_parameters(model)}
    for param in model.parameters():
        want = id(param) in trainable
        if param.requires_grad != want and (param.is_floating_point() or not want):
            param.requires_grad_(want)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, shared tensors once; 4-bit weights count as the weights they stand for."""
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
