"""LoRA, rsLoRA and DoRA: low-rank updates of frozen linear layers.

* LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". A frozen
  weight ``W`` (out x in) is adapted as ``W + s * B @ A`` with ``A`` (r x in) initialized
  like ``nn.Linear`` (Kaiming-uniform), ``B`` (out x r) zero, and ``s = alpha / r``; the
  model is unchanged at step 0.
* rsLoRA: Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with
  LoRA": ``s = alpha / sqrt(r)``.
* DoRA: Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation". The adapted weight
  is split into a trainable magnitude per output row ``m`` and a direction:
  ``W' = m * (W + s B A) / ||W + s B A||_row``, with the norm treated as a constant
  (detached from the gradient, section 4.3 of the paper). ``m`` starts at ``||W||_row``.

Each adapted layer becomes one :class:`LoRALinear` holding the frozen base layer
(``nn.Linear``, transformers' ``Conv1D``, or a bitsandbytes 4-bit layer swapped in later)
and one :class:`LoRAWeights` per adapter. Every active adapter adds its update to the base
output, each computed from the base weight. The low-rank kernels live in
:mod:`lightning_peft.methods.lora_kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.heads import copy_modules, remove_copies, saved_module_target, saved_modules
from ..core.layers import dense_weight, editable_weight, is_conv1d, layer_features
from ..core.ownership import LayerWrapper, undeclare
from ..core.sharded import full_tensor
from ..core.targeting import backbone_prefix, find_backbone, replace_module, select_modules
from .base import Method, MethodError, register
from .lora_combine import combine_lora
from .lora_kernels import LoRAWeights, check_names, dora_contribution, low_rank_forward, routed_low_rank

_PEFT_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


class LoRALinear(LayerWrapper):
    """A frozen linear layer plus one trainable low-rank update per adapter.

    ``forward(x) = base(x) + sum over active adapters of s B A dropout(x)`` (LoRA), each
    DoRA adapter contributing ``(g - 1) W x + g s B A dropout(x)`` with
    ``g = m / ||W + s B A||_row``. Merged adapters are skipped (the base holds them).

    Args:
        base_layer: The layer to adapt; kept as ``self.base_layer`` and changed only by merges.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora = nn.ModuleDict()
        self._routing_cache: dict = {}  # stacked factors for per-row routing (inference)
        self.train(base_layer.training)

    @property
    def in_features(self) -> int:
        """Input width."""
        return layer_features(self.innermost())[0]

    @property
    def out_features(self) -> int:
        """Output width."""
        return layer_features(self.innermost())[1]

    @property
    def merged(self) -> bool:
        """Whether any adapter is folded into the base weight."""
        return any(w.merged for w in self.lora.values())

    def extra_repr(self) -> str:
        """The adapters."""
        return f"adapters={list(self.lora)}, merged={self.merged}"

    def add(self, weights: LoRAWeights) -> None:
        """Attach one adapter's weights."""
        self.lora[weights.adapter_name] = weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        """Base output plus the update of every active, unmerged adapter."""
        result = self.base_layer(x)  # (..., out)
        parts = [w for w in self.lora.values() if not w.merged and w.serves()]
        if not parts:
            return result
        base_out = result
        # without gradients the updates go into the base output, unless DoRA or a hook reads it
        inplace = (
            not torch.is_grad_enabled()
            and not self.base_layer._forward_hooks
            and all(w.magnitude is None for w in parts)
        )
        batched = [w for w in parts if w.rows is not None and w.magnitude is None and not w.dropping()]
        if batched:  # per-row routing: every row's update in two batched products
            result = routed_low_rank(batched, x, result, self._routing_cache, inplace)
            parts = [w for w in parts if w not in batched]
        for weights in parts:
            if weights.magnitude is not None:
                result = result + dora_contribution(weights, self.base_layer, x, base_out)
            else:
                result = low_rank_forward(weights, x, result, inplace)
        return result

    # -- merging ---------------------------------------------------------------------------
    def _delta(self, weights: LoRAWeights, base: torch.Tensor) -> torch.Tensor:
        """What adapter ``weights`` adds to the ``(out, in)`` base weight ``base`` (fp32)."""
        update = weights.delta_weight().float()  # (out, in)
        if weights.magnitude is None:
            return update
        g = full_tensor(weights.magnitude).float() / torch.linalg.vector_norm(base + update, dim=1)  # (out,)
        return (g - 1).unsqueeze(1) * base + g.unsqueeze(1) * update

    def folded_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in)`` weight this layer computes with, every active adapter folded in (a new tensor)."""
        with torch.no_grad():
            base = dense_weight(self.base_layer).float()  # (out, in), dequantized if 4-bit
            total = base.clone()
            for weights in self.lora.values():
                if weights.active and not weights.merged:
                    total += self._delta(weights, base)
            return total.to(dtype)

    def merge_adapter(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight in place (no-op if it is merged already).

        Raises:
            MethodError: If the base is quantized, the update is not finite, or a DoRA
                adapter shares the layer with other active adapters (its norm is defined
                against the unmerged base).
        """
        weights = self.lora[name]
        if weights.merged:
            return
        self.check_mergeable(name)
        weight = editable_weight(self.base_layer)  # (out, in) view of the parameter
        with torch.no_grad():
            base = weight.float()
            delta = self._delta(weights, base)
            if weights.magnitude is not None:
                factor = weights.magnitude.float() / torch.linalg.vector_norm(
                    base + weights.delta_weight().float(), dim=1
                )  # (out,)
                weights.merge_factor = factor
            weight.copy_((base + delta).to(weight.dtype))
        weights.merged = True

    def unmerge_adapter(self, name: str) -> None:
        """Take adapter ``name`` out of the base weight again (exact up to float rounding)."""
        weights = self.lora[name]
        if not weights.merged:
            return
        weight = editable_weight(self.base_layer)
        with torch.no_grad():
            if weights.magnitude is None:
                weight.sub_(weights.delta_weight().to(weight.dtype))
            else:
                original = weight.float() / weights.merge_factor.unsqueeze(1) - weights.delta_weight().float()
                weight.copy_(original.to(weight.dtype))
                weights.merge_factor = None
        weights.merged = False

    def check_mergeable(self, name: str) -> None:
        """Raise :class:`MethodError` if :meth:`merge_adapter` would fail or give non-finite weights."""
        weights = self.lora[name]
        if weights.merged:
            return
        try:
            weight = editable_weight(self.base_layer)
        except ValueError as err:
            raise MethodError(str(err)) from None
        others = [n for n, w in self.lora.items() if n != name and (w.active or w.merged)]
        if weights.magnitude is not None and others:
            raise MethodError(
                f"DoRA adapter {name!r} shares a layer with active adapters {others}: its norm is defined "
                "against the unmerged base, so merging it in place would change what the layer computes. "
                "Switch the others off (lightning_peft.set_adapter) before merging, or use export_merged."
            )
        with torch.no_grad():
            new = weight.float() + self._delta(weights, weight.float())
            if not bool(torch.isfinite(new).all()):
                raise MethodError(
                    f"refusing to merge adapter {name!r}: its update is not finite (NaN or inf in lora_a/lora_b/"
                    "magnitude, or an overflow in the base dtype); the base weights were left untouched"
                )


def lora_layer(
    base: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_dora: bool = False,
    use_rslora: bool = False,
    adapter_name: str = "default",
) -> LoRALinear:
    """A :class:`LoRALinear` around ``base`` with one adapter (a building block for your own modules)."""
    layer = LoRALinear(base)
    in_f, out_f = layer_features(layer.innermost())
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    layer.add(LoRAWeights(adapter_name, in_f, out_f, r, scale, dropout, use_dora, base))
    return layer


def lora_layers(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, LoRALinear]]:
    """``(qualified_name, layer)`` of every :class:`LoRALinear` in ``model`` (holding ``adapter_name`` if given)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, LoRALinear) and (adapter_name is None or adapter_name in m.lora)
    ]


# --------------------------------------------------------------------------- the method
@register
@dataclass
class LoRAConfig(Method):
    """Low-rank updates of linear layers (LoRA), with the rsLoRA and DoRA variants."""

    r: int = 8
    """Rank of the update ``B @ A`` (a positive integer)."""
    alpha: float = 16
    """Scaling numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in ``[0, 1)``; 0 adds no work at all."""
    target_modules: str | list[str] = "all-linear"
    """Layers to adapt: ``"all-linear"`` (every linear layer but the output head), a regex
    fully matched against names relative to the Hugging Face model, or a list of names
    (full or trailing components, e.g. ``["q_proj", "v_proj"]``; each must match a layer)."""
    exclude_modules: str | list[str] | None = None
    """Layers to leave alone, in the same forms as ``target_modules`` (except ``"all-linear"``)."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output row, with the direction normalized."""
    use_rslora: bool = False
    """rsLoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    modules_to_save: list[str] | None = None
    """Modules (same matching as ``target_modules``) whose every parameter trains and is saved."""

    name = "lora"
    callback_name = "LoRA"
    example = {"r": 4, "alpha": 8}
    peft_types = ("LORA",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer (e.g. 8 or 16), got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a positive number (commonly 2 * r), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"LoRA dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1) (0 disables it), got {self.dropout!r}")
        self.target_modules = check_names(self.target_modules, "target_modules", True)
        if self.target_modules is None:
            raise ValueError("target_modules is required: 'all-linear', a regex, or a list of names")
        self.exclude_modules = check_names(self.exclude_modules, "exclude_modules", False)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = check_names(self.modules_to_save, "modules_to_save", False)
        for flag in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    @property
    def scale(self) -> float:
        """The factor the update is multiplied by."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    # -- inject ----------------------------------------------------------------------------
    def inject(self, model: nn.Module) -> None:
        """Wrap every targeted layer in a :class:`LoRALinear` (or join the one there) and add this adapter."""
        chosen = select_modules(model, self.target_modules, self.exclude_modules)
        foreign = [n for n, m in chosen if isinstance(m, LayerWrapper) and not isinstance(m, LoRALinear)]
        if foreign:
            raise ValueError(
                f"layers {foreign[:4]} are already wrapped by another method ({type(model.get_submodule(foreign[0])).__name__}); "
                "LoRA cannot adapt the same layers: narrow target_modules or use exclude_modules"
            )
        saved: list[tuple[str, nn.Module]] = []
        if self.modules_to_save:
            saved = select_modules(model, self.modules_to_save, types=(nn.Module,), what="modules_to_save")
            targets = [name for name, _ in chosen]
            overlap = [s for s, _ in saved for t in targets if t == s or t.startswith(s + ".")]
            if overlap:
                raise ValueError(
                    f"modules_to_save {sorted(set(overlap))} contain layers LoRA adapts; a module either "
                    "trains fully (modules_to_save) or gets LoRA (target_modules): use exclude_modules"
                )
        for name, module in chosen:
            layer = module if isinstance(module, LoRALinear) else LoRALinear(module)
            in_f, out_f = layer_features(layer.innermost())
            layer.add(
                LoRAWeights(
                    self.adapter_name,
                    in_f,
                    out_f,
                    self.r,
                    self.scale,
                    self.dropout,
                    self.use_dora,
                    layer.base_layer,
                )
            )
            if layer is not module:
                replace_module(model, name, layer)
        copy_modules(model, [name for name, _ in saved], self.adapter_name)

    # -- merging ---------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold this adapter into every layer it adapts (all layers are checked before any changes).

        Raises:
            MethodError: If a layer has a non-finite update or a quantized base, or DoRA
                shares a layer with other active adapters; then no layer is changed.
        """
        layers = [layer for _, layer in lora_layers(model, self.adapter_name)]
        for layer in layers:
            layer.check_mergeable(self.adapter_name)
        for layer in layers:
            layer.merge_adapter(self.adapter_name)

    def unmerge(self, model: nn.Module) -> None:
        """Take this adapter out of the base weights again."""
        for _, layer in lora_layers(model, self.adapter_name):
            layer.unmerge_adapter(self.adapter_name)

    def remove(self, model: nn.Module) -> None:
        """Take this adapter out (unmerged first); a layer left without adapters gets its plain self back."""
        self.unmerge(model)
        for name, layer in lora_layers(model, self.adapter_name):
            del layer.lora[self.adapter_name]
            if not len(layer.lora):
                replace_module(model, name, layer.base_layer)
        remove_copies(model, self.adapter_name)
        for module in model.modules():
            undeclare(module, self.adapter_name)

    def check_routable(self, model: nn.Module, adapters: list[Method]) -> None:
        """Rows may use different LoRA adapters: their updates are computed in one batched product."""

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
        """Add adapter ``name`` combining LoRA adapters (see ``lightning_peft.add_weighted_adapter``)."""
        names = {s.adapter_name for s in sources}
        layers = {n: layer for n, layer in lora_layers(model) if names & set(layer.lora)}
        combine_lora(
            model, layers, sources, weights, name, combination, rank=rank, density=density, seed=seed
        )

    def folded_layers(self, model: nn.Module, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
        """Each adapted layer's weight with every active adapter folded in, and its bias."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, layer in lora_layers(model, self.adapter_name):
            tensors = {"weight": layer.folded_weight(dtype)}  # (out, in)
            bias = getattr(layer.innermost(), "bias", None)
            if bias is not None:
                tensors["bias"] = full_tensor(bias).to(dtype).clone()
            out[name] = tensors
        return out

    # -- Hugging Face PEFT format ----------------------------------------------------------
    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(adapter_config, state_dict)`` in PEFT's LoRA format, names relative to the HF model.

        The state dict holds ``<layer>.lora_A.weight`` (r, in), ``<layer>.lora_B.weight``
        (out, r), ``<layer>.lora_magnitude_vector`` (out,) for DoRA, and every parameter of
        the modules saved in full (``modules_to_save`` and trainable task heads) under its
        plain name.
        """
        backbone = find_backbone(model)
        layers = lora_layers(backbone, self.adapter_name)
        if not layers:
            raise MethodError(f"to_peft: the model has no LoRA layers of adapter {self.adapter_name!r}")
        state: dict[str, torch.Tensor] = {}
        conv1d = False
        for name, layer in layers:
            weights = layer.lora[self.adapter_name]
            conv1d |= (
                is_conv1d(layer.innermost()) or getattr(layer.innermost(), "source_type", "") == "Conv1D"
            )
            state[f"{name}.lora_A.weight"] = weights.lora_a.detach()
            state[f"{name}.lora_B.weight"] = weights.lora_b.detach()
            if weights.magnitude is not None:
                state[f"{name}.lora_magnitude_vector"] = weights.magnitude.detach()
        saved = saved_modules(model, self.adapter_name)
        for module_name, module in saved.items():
            for pname, param in module.named_parameters():
                state[f"{module_name}.{pname}"] = param.detach()
        config = {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": _peft_targets(backbone, [n for n, _ in layers]),
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "modules_to_save": list(saved) or None,
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "init_lora_weights": True,
            "inference_mode": True,
            "task_type": next(
                (t for suffix, t in _PEFT_TASKS if type(backbone).__name__.endswith(suffix)), None
            ),
        }
        return config, state

    def from_peft(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a PEFT LoRA state dict to this adapter's tensor names in ``model``.

        Raises:
            MethodError: If a key has no counterpart in ``model`` or a shape differs.
        """
        prefix = backbone_prefix(model)
        ours = dict(model.named_parameters())
        mine = f".lora.{self.adapter_name}."
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            name = key.removeprefix("base_model.model.")
            for peft_part, our_part in (
                (".lora_A.weight", "lora_a"),
                (".lora_B.weight", "lora_b"),
                (".lora_magnitude_vector.weight", "magnitude"),
                (".lora_magnitude_vector", "magnitude"),
            ):
                if name.endswith(peft_part):
                    target = prefix + name[: -len(peft_part)] + mine + our_part
                    break
            else:  # a module saved in full (PEFT's modules_to_save)
                target = saved_module_target(
                    model, name.replace(".modules_to_save.default.", "."), self.adapter_name
                )
            if target not in ours:
                raise MethodError(
                    f"PEFT key {key!r} maps to {target!r}, which this model does not have; was the adapter "
                    "trained for another architecture or with other target_modules?"
                )
            if tuple(ours[target].shape) != tuple(value.shape):
                raise MethodError(
                    f"PEFT tensor {key!r} has shape {tuple(value.shape)} but {target} is {tuple(ours[target].shape)}"
                )
            out[target] = value
        return out

    @classmethod
    def from_peft_config(cls, config: dict[str, Any], adapter_name: str = "default") -> LoRAConfig:
        """Build a :class:`LoRAConfig` from a PEFT ``adapter_config.json`` dict.

        Raises:
            MethodError: For a non-LoRA config or PEFT options this implementation lacks.
        """
        if config.get("peft_type", "LORA") != "LORA":
            raise MethodError(f"not a LoRA adapter: peft_type={config.get('peft_type')!r}")
        unsupported = {
            "rank_pattern": lambda v: bool(v),
            "alpha_pattern": lambda v: bool(v),
            "layers_to_transform": lambda v: v is not None,
            "target_parameters": lambda v: bool(v),
            "lora_bias": lambda v: bool(v),
            "bias": lambda v: v not in (None, "none"),
            "use_qalora": lambda v: bool(v),
            "trainable_token_indices": lambda v: bool(v),
        }
        bad = [k for k, test in unsupported.items() if k in config and test(config[k])]
        if bad:
            raise MethodError(f"PEFT LoRA options {bad} are not supported; only plain LoRA/DoRA/rsLoRA are")
        targets = config.get("target_modules")
        if isinstance(targets, (list, tuple, set)):
            targets = sorted(targets)
        return cls(
            r=int(config["r"]),
            alpha=config.get("lora_alpha", 8),
            dropout=float(config.get("lora_dropout", 0.0) or 0.0),
            target_modules=targets if targets else "all-linear",
            exclude_modules=config.get("exclude_modules") or None,
            use_dora=bool(config.get("use_dora", False)),
            use_rslora=bool(config.get("use_rslora", False)),
            modules_to_save=list(config["modules_to_save"]) if config.get("modules_to_save") else None,
            adapter_name=adapter_name,
        )


def _peft_targets(backbone: nn.Module, adapted: list[str]) -> list[str]:
    """Shortest target list PEFT's suffix matching maps to exactly ``adapted``.

    Trailing names (``["q_proj", "v_proj"]``) when they pick out the same layers; the full
    names otherwise.
    """
    short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    picked = {
        name
        for name, _ in backbone.named_modules()
        if any(name == s or name.endswith("." + s) for s in short)
    }
    return short if picked == set(adapted) else sorted(adapted)
