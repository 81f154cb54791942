"""(IA)³: learned vectors that rescale activations inside the frozen model.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (T-Few). A learned vector ``l`` rescales, elementwise, the output of
the attention key and value projections and the *input* of the feed-forward output
projection: ``y = (W x) * l_out`` or ``y = W (x * l_in)``. The vectors start at one, so
the adapted model starts equal to the base model; only ``l`` trains (about 0.01% of a
transformer's weights).

The options and their meaning follow Hugging Face PEFT's ``IA3Config``: ``target_modules``
picks the layers, ``feedforward_modules`` (a subset of them) picks the ones whose input is
scaled; both default to the model family's usual choice. The vectors have PEFT's shapes,
``(out, 1)`` for output scaling and ``(1, in)`` for input scaling, so adapters export to
and import from PEFT's ``IA3`` format as they are. Several adapters on one layer multiply
their vectors. Merging folds the vectors into the weight (rows or columns) and the bias
(output scaling only); unmerging divides them out again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.heads import copy_modules, remove_copies, saved_module_target, saved_modules
from ..core.layers import dense_weight, editable_weight, is_conv1d, layer_features
from ..core.ownership import AdapterPart, LayerWrapper, declare_trainable, undeclare
from ..core.sharded import full_tensor
from ..core.targeting import (
    backbone_prefix,
    find_backbone,
    matches,
    replace_module,
    select_modules,
    suggest_names,
)
from .base import Method, MethodError, register

# Each family's usual targets and feed-forward layers (those whose input is scaled).
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
}


class IA3Vector(AdapterPart):
    """One adapter's scaling vector on one layer: ``(out, 1)`` for outputs, ``(1, in)`` for inputs."""

    def __init__(self, adapter_name: str, shape: tuple[int, int], device: Any, dtype: torch.dtype) -> None:
        super().__init__(adapter_name)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        declare_trainable(self, adapter=adapter_name)

    def scaling(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The factor for the current forward: ``(dim,)``, or ``(B, 1, ..., dim)`` when routed per row."""
        vector = self.ia3_l.flatten().to(like.dtype)  # (dim,)
        if self.rows is None:
            return vector
        rows = self.rows.to(like.device).view(batch, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)
        return torch.where(rows, vector, torch.ones_like(vector))  # (B, 1, ..., dim)


class IA3Linear(LayerWrapper):
    """A frozen linear layer whose input or output the active (IA)³ adapters rescale.

    Args:
        base_layer: The layer (``nn.Linear``, ``Conv1D`` or a 4-bit layer).
        feedforward: Scale the input (``True``) or the output (``False``).
    """

    def __init__(self, base_layer: nn.Module, feedforward: bool) -> None:
        super().__init__(base_layer)
        self.feedforward = feedforward
        self.ia3 = nn.ModuleDict()
        self.train(base_layer.training)

    def extra_repr(self) -> str:
        """Which side is scaled, and by whom."""
        return f"scales={'input' if self.feedforward else 'output'}, adapters={list(self.ia3)}"

    def _factor(self, like: torch.Tensor) -> torch.Tensor | None:
        factor = None
        for vector in self.ia3.values():
            if vector.merged or not vector.serves():
                continue
            scale = vector.scaling(like.shape[0], like)
            factor = scale if factor is None else factor * scale
        return factor

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # x: (..., in)
        """``base(x * l)`` (feed-forward) or ``base(x) * l``, with ``l`` the product of the active vectors."""
        if self.feedforward:
            factor = self._factor(x)
            return self.base_layer(x if factor is None else x * factor, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        factor = self._factor(result)
        return result if factor is None else result * factor

    # -- merging ---------------------------------------------------------------------------
    def _fold(
        self, weight: torch.Tensor, bias: torch.Tensor | None, vector: torch.Tensor, undo: bool
    ) -> None:
        v = vector.flatten().to(weight.dtype)
        if undo:
            v = 1.0 / v
        if self.feedforward:
            weight.mul_(v.unsqueeze(0))  # (out, in) * (1, in): columns
        else:
            weight.mul_(v.unsqueeze(1))  # (out, in) * (out, 1): rows
            if bias is not None:
                bias.mul_(v.to(bias.dtype))

    def merge_adapter(self, name: str) -> None:
        """Fold adapter ``name``'s vector into the base weight (and bias) in place."""
        vector = self.ia3[name]
        if vector.merged:
            return
        self.check_mergeable(name)
        base = self.innermost()
        with torch.no_grad():
            bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
            self._fold(editable_weight(base), bias, vector.ia3_l, undo=False)
        vector.merged = True

    def unmerge_adapter(self, name: str) -> None:
        """Divide adapter ``name``'s vector out of the base weight again (exact up to rounding)."""
        vector = self.ia3[name]
        if not vector.merged:
            return
        base = self.innermost()
        with torch.no_grad():
            bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
            self._fold(editable_weight(base), bias, vector.ia3_l, undo=True)
        vector.merged = False

    def check_mergeable(self, name: str) -> None:
        """Raise :class:`MethodError` if the base is quantized or the vector cannot be divided out again."""
        try:
            editable_weight(self.innermost())
        except ValueError as err:
            raise MethodError(str(err)) from None
        values = self.ia3[name].ia3_l.detach()
        if not bool(torch.isfinite(values).all()) or bool((values == 0).any()):
            raise MethodError(
                f"refusing to merge (IA)³ adapter {name!r}: its vector holds zeros or non-finite values, so the "
                "merge could not be undone; the base weights were left untouched"
            )

    def folded(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The base weight and bias with every active, unmerged vector folded in (new tensors)."""
        base = self.innermost()
        with torch.no_grad():
            weight = dense_weight(base).float().clone()  # (out, in), dequantized if 4-bit
            bias = full_tensor(base.bias).float().clone() if getattr(base, "bias", None) is not None else None
            for vector in self.ia3.values():  # FSDP2 shards are gathered: a collective
                if vector.active and not vector.merged:
                    self._fold(weight, bias, full_tensor(vector.ia3_l).float(), undo=False)
        out = {"weight": weight.to(dtype)}
        if bias is not None:
            out["bias"] = bias.to(dtype)
        return out


def _check_feedforward(feedforward: str | list[str], targeted: list[str]) -> None:
    """Refuse feed-forward entries (or a regex) that name none of the targeted layers: a typo would scale the wrong side.

    Raises:
        ValueError: Naming the entry, the closest targeted names and the targeted layers.
    """
    kinds = ", ".join(dict.fromkeys(t.rsplit(".", 1)[-1] for t in targeted))
    if isinstance(feedforward, str):
        if not any(re.fullmatch(feedforward, t) for t in targeted):
            raise ValueError(
                f"feedforward_modules={feedforward!r} matches none of the layers (IA)³ targets ({kinds}); the "
                "regex is matched against full names relative to the Hugging Face model"
            )
        return
    for entry in feedforward:
        if not any(matches(t, entry) for t in targeted):
            raise ValueError(
                f"feedforward_modules entry {entry!r} matches none of the layers (IA)³ targets"
                f"{suggest_names(entry, targeted)} Targeted layers: {kinds}; feed-forward layers must be targets too"
            )


def ia3_layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, IA3Linear]]:
    """``(qualified_name, layer)`` of every :class:`IA3Linear` in ``model`` (holding ``adapter_name`` if given)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, IA3Linear) and (adapter_name is None or adapter_name in m.ia3)
    ]


def _vector_dtype(base: nn.Module) -> torch.dtype:
    """float32, or the layer's dtype when wider (a 4-bit layer counts as its compute dtype)."""
    weight = base.weight
    quantized = getattr(weight, "quant_state", None) is not None or not weight.dtype.is_floating_point
    dtype = (getattr(base, "compute_dtype", None) or torch.float32) if quantized else weight.dtype
    return torch.promote_types(dtype, torch.float32)


def _as_names(value: Any, what: str, allow_empty: bool = False) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if (
        isinstance(value, (list, tuple))
        and (value or allow_empty)
        and all(isinstance(v, str) and v for v in value)
    ):
        return list(value)
    kind = "list" if allow_empty else "non-empty list"
    raise ValueError(f"{what} must be a regular expression string or a {kind} of module names; got {value!r}")


@register
@dataclass
class IA3Config(Method):
    """(IA)³: learned vectors rescaling attention projections' outputs and feed-forward inputs."""

    target_modules: str | list[str] | None = None
    """Layers to rescale: a regex over names relative to the Hugging Face model, a list of
    names (full or trailing components), ``"all-linear"``, or ``None`` for the model
    family's usual choice (Llama: ``k_proj``, ``v_proj``, ``down_proj``; BERT: ``key``,
    ``value``, ``output.dense``; GPT-2: ``c_attn``, ``mlp.c_proj``)."""
    feedforward_modules: str | list[str] | None = None
    """The targets whose *input* is scaled (the others' output is): a subset of
    ``target_modules`` in the same forms; ``None`` for the family's feed-forward output layer."""
    exclude_modules: str | list[str] | None = None
    """Layers to leave alone, in the same forms as ``target_modules``."""
    modules_to_save: list[str] | None = None
    """Modules whose every parameter trains and is saved with the adapter."""
    init_ia3_weights: bool = True
    """Start every vector at one (the adapted model equals the base). ``False`` draws them
    from a standard normal, as PEFT does, which is rarely what you want."""

    name = "ia3"
    callback_name = "IA3"
    peft_types = ("IA3",)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = _as_names(self.target_modules, "target_modules")
        self.feedforward_modules = _as_names(
            self.feedforward_modules, "feedforward_modules", allow_empty=True
        )
        self.exclude_modules = _as_names(self.exclude_modules, "exclude_modules")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = _as_names(self.modules_to_save, "modules_to_save")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, list) and isinstance(feedforward, list):
            stray = [f for f in feedforward if not any(matches(f, t) or matches(t, f) for t in targets)]
            if stray:
                raise ValueError(
                    f"feedforward_modules {stray} are not among target_modules {targets}: the layers whose input "
                    "(IA)³ scales must be targets too"
                )

    def _resolved(self, model: nn.Module) -> tuple[str | list[str], str | list[str]]:
        """``(targets, feedforward)`` with the family defaults filled in."""
        targets, feedforward = self.target_modules, self.feedforward_modules
        if targets is None or feedforward is None:
            config = getattr(find_backbone(model), "config", None)
            family = getattr(config, "model_type", None)
            if family not in DEFAULT_TARGETS:
                raise ValueError(
                    f"(IA)³ has no default target_modules for model type {family!r}; pass target_modules and "
                    f"feedforward_modules (defaults exist for {sorted(DEFAULT_TARGETS)})"
                )
            default_targets, default_feedforward = DEFAULT_TARGETS[family]
            targets = default_targets if targets is None else targets
            feedforward = default_feedforward if feedforward is None else feedforward
        return targets, feedforward

    # -- inject ----------------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        """Wrap every targeted layer in an :class:`IA3Linear` (or join the one there) and add this adapter's vector."""
        targets, feedforward = self._resolved(model)
        chosen = select_modules(model, targets, self.exclude_modules)
        prefix = backbone_prefix(model)
        foreign = [n for n, m in chosen if isinstance(m, LayerWrapper) and not isinstance(m, IA3Linear)]
        if foreign:
            raise ValueError(
                f"layers {foreign[:4]} are already wrapped by another method; (IA)³ cannot rescale the same layers: "
                "narrow target_modules or use exclude_modules"
            )
        _check_feedforward(feedforward, [name.removeprefix(prefix) for name, _ in chosen])
        saved = []  # checked before any layer changes
        if self.modules_to_save:
            saved = select_modules(model, self.modules_to_save, types=(nn.Module,), what="modules_to_save")
        for name, module in chosen:
            relative = name.removeprefix(prefix)
            if isinstance(feedforward, str):
                is_ff = re.fullmatch(feedforward, relative) is not None
            else:
                is_ff = any(matches(relative, f) for f in feedforward)
            layer = module if isinstance(module, IA3Linear) else IA3Linear(module, is_ff)
            if layer.feedforward != is_ff:
                side = "input" if layer.feedforward else "output"
                raise ValueError(
                    f"{relative} is rescaled on its {side} by another (IA)³ adapter; every adapter of a layer "
                    "must scale the same side"
                )
            base = layer.innermost()
            in_f, out_f = layer_features(base)
            shape = (1, in_f) if is_ff else (out_f, 1)
            vector = IA3Vector(self.adapter_name, shape, base.weight.device, _vector_dtype(base))
            if not self.init_ia3_weights and base.weight.device.type != "meta":
                with torch.no_grad():
                    vector.ia3_l.normal_()
            vector.train(base.training)
            layer.ia3[self.adapter_name] = vector
            if layer is not module:
                replace_module(model, name, layer)
        copy_modules(model, [name for name, _ in saved], self.adapter_name)

    # -- merging ---------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold this adapter's vectors into the base weights (every layer is checked before any changes)."""
        layers = [layer for _, layer in ia3_layers(model, self.adapter_name)]
        for layer in layers:
            layer.check_mergeable(self.adapter_name)
        for layer in layers:
            layer.merge_adapter(self.adapter_name)

    def unmerge(self, model: nn.Module) -> None:
        """Divide this adapter's vectors out of the base weights again."""
        for _, layer in ia3_layers(model, self.adapter_name):
            layer.unmerge_adapter(self.adapter_name)

    def folded_layers(self, model: nn.Module, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        """Each rescaled layer's weight and bias with every active vector folded in."""
        return {name: layer.folded(dtype) for name, layer in ia3_layers(model, self.adapter_name)}

    def remove(self, model: nn.Module) -> None:
        """Take this adapter's vectors (and module copies) out; a layer left without vectors gets its plain self back."""
        self.unmerge(model)
        remove_copies(model, self.adapter_name)
        for name, layer in ia3_layers(model, self.adapter_name):
            del layer.ia3[self.adapter_name]
            if not len(layer.ia3):
                replace_module(model, name, layer.base_layer)
        for module in model.modules():
            undeclare(module, self.adapter_name)

    def check_routable(self, model: nn.Module, adapters: list[Method]) -> None:
        """Rows of one batch may use different (IA)³ adapters: each row gets its own vectors."""

    # -- Hugging Face PEFT -------------------------------------------------------------
    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(adapter_config, state_dict)`` in PEFT's ``IA3`` format (``<layer>.ia3_l``), names relative to the HF model."""
        backbone = find_backbone(model)
        layers = ia3_layers(backbone, self.adapter_name)
        if not layers:
            raise MethodError(f"to_peft: the model has no (IA)³ layers of adapter {self.adapter_name!r}")
        state = {f"{name}.ia3_l": layer.ia3[self.adapter_name].ia3_l.detach() for name, layer in layers}
        saved = saved_modules(model, self.adapter_name)
        for module_name, module in saved.items():
            for pname, param in module.named_parameters():
                state[f"{module_name}.{pname}"] = param.detach()
        names = sorted(n for n, _ in layers)
        config = {
            "peft_type": "IA3",
            "target_modules": names,
            "feedforward_modules": sorted(n for n, layer in layers if layer.feedforward),
            "fan_in_fan_out": any(is_conv1d(layer.innermost()) for _, layer in layers),
            "modules_to_save": list(saved) or None,
            "init_ia3_weights": True,
            "inference_mode": True,
            "task_type": "CAUSAL_LM"
            if type(backbone).__name__.endswith(("ForCausalLM", "LMHeadModel"))
            else None,
        }
        return config, state

    def from_peft(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a PEFT (IA)³ state dict (``<layer>.ia3_l``) to this adapter's tensor names in ``model``."""
        prefix = backbone_prefix(model)
        ours = dict(model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            name = key.removeprefix("base_model.model.")
            for peft_part in (f".ia3_l.{self.adapter_name}", ".ia3_l.default", ".ia3_l"):
                if name.endswith(peft_part):
                    target = f"{prefix}{name[: -len(peft_part)]}.ia3.{self.adapter_name}.ia3_l"
                    break
            else:  # a module saved in full (PEFT's modules_to_save)
                target = saved_module_target(
                    model, name.replace(".modules_to_save.default.", "."), self.adapter_name
                )
            if target not in ours or tuple(ours[target].shape) != tuple(value.shape):
                raise MethodError(
                    f"PEFT key {key!r} {tuple(value.shape)} has no counterpart in this model ({target}); was the "
                    "adapter trained for another architecture or with other target_modules?"
                )
            out[target] = value
        return out

    @classmethod
    def from_peft_config(cls, config: dict[str, Any], adapter_name: str = "default") -> IA3Config:
        """Build an :class:`IA3Config` from a PEFT ``adapter_config.json`` dict."""
        if config.get("peft_type") != "IA3":
            raise MethodError(f"not an (IA)³ adapter: peft_type={config.get('peft_type')!r}")

        def names(value: Any) -> str | list[str] | None:
            return sorted(value) if isinstance(value, (list, tuple, set)) else value

        return cls(
            target_modules=names(config.get("target_modules")),
            feedforward_modules=names(config.get("feedforward_modules")),
            exclude_modules=names(config.get("exclude_modules")),
            modules_to_save=list(config["modules_to_save"]) if config.get("modules_to_save") else None,
            adapter_name=adapter_name,
        )
