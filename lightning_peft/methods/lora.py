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

The base layer (``nn.Linear``, transformers' ``Conv1D``, or a bitsandbytes 4-bit layer
swapped in later) is kept untouched inside :class:`LoRALinear` and always called as
``self.base(x)``; the adapter path is added to its output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..targeting import LINEAR_TYPES, backbone_prefix, find_backbone, replace_module, select_modules
from .base import Method, declare_trainable, register, trainable_named_parameters

try:  # transformers' GPT-2 style linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None  # type: ignore[assignment,misc]


# --------------------------------------------------------------------------- weights
def _is_plain(layer: nn.Module) -> bool:
    """A dense ``nn.Linear`` or ``Conv1D`` whose weight is an ordinary floating tensor."""
    weight = getattr(layer, "weight", None)
    return (
        isinstance(layer, LINEAR_TYPES)
        and isinstance(weight, torch.Tensor)
        and weight.dtype.is_floating_point
        and getattr(weight, "quant_state", None) is None
        and type(weight) in (torch.Tensor, nn.Parameter)
    )


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of ``layer``, dequantized if it is a 4-bit layer.

    Plain layers return a detached view that shares storage with the parameter (no copy);
    anything else goes through :func:`lightning_peft.quantization.dense_weight`.
    """
    if _is_plain(layer):
        weight = layer.weight.detach()
        return weight.T if Conv1D is not None and isinstance(layer, Conv1D) else weight
    from ..quantization import dense_weight as dequantized

    return dequantized(layer)


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer of any supported kind."""
    if Conv1D is not None and isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.nf
    return layer.in_features, layer.out_features


def _param_dtype(layer: nn.Module) -> torch.dtype:
    """The adapter parameters' dtype: the layer's, or its compute dtype if it is quantized."""
    weight = layer.weight
    if weight.dtype.is_floating_point and getattr(weight, "quant_state", None) is None:
        return weight.dtype
    return getattr(layer, "compute_dtype", None) or torch.float32


# --------------------------------------------------------------------------- dropout path
def keep_mask(like: torch.Tensor, keep: float) -> torch.Tensor:
    """A bool mask shaped like ``like`` whose entries are ``True`` with probability ``keep``.

    On CPU, drawing one float per element (what ``torch.nn.functional.dropout`` does) costs
    more than the adapter's matmuls. Here each 64-bit draw of the generator gives four
    independent 16-bit uniforms, which is about five times faster; ``keep`` is rounded to a
    multiple of 2**-16 (an error below 8e-6). Seeded by the global torch generator as usual.
    """
    n = like.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=like.device)
    draws = words.view(torch.int16)[:n].view(like.shape)  # uniform over the int16 range
    return draws < round(keep * 65536) - 32768


class _DroppedLowRank(torch.autograd.Function):
    """``result + s * B A dropout(x)`` keeping only the 1-byte mask for backward.

    Autograd would save the dropped copy of ``x`` (4 bytes per element in fp32) for the
    gradient of ``A``; here the input ``x`` itself is saved (the caller's graph holds it
    anyway) and the dropped copy is rebuilt from the mask in backward.
    """

    @staticmethod
    def forward(ctx: Any, x, result, a, b, p: float, scale: float):  # noqa: D102
        if x.device.type == "cpu":
            mask = keep_mask(x, 1.0 - p)  # bool (..., in)
            dropped = torch.ops.aten.native_dropout_backward(x, mask, 1.0 / (1.0 - p))  # x * mask / (1-p)
        else:  # one fused kernel on accelerators
            dropped, mask = torch.native_dropout(x, p, True)  # (..., in), bool mask (..., in)
        h = F.linear(dropped, a)  # (..., r)
        del dropped
        out_f = result.shape[-1]
        out = torch.addmm(result.reshape(-1, out_f), h.reshape(-1, h.shape[-1]), b.t(), alpha=scale)
        ctx.save_for_backward(x, mask, a, b, h)
        ctx.p, ctx.scale = p, scale
        return out.view(result.shape)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad):  # noqa: D102
        x, mask, a, b, h = ctx.saved_tensors
        keep = 1.0 / (1.0 - ctx.p)
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        h2 = h.reshape(-1, h.shape[-1])  # (N, r)
        grad_h = torch.mm(g, b).mul_(ctx.scale)  # (N, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = torch.mm(g.t(), h2).mul_(ctx.scale)  # (out, r)
        if ctx.needs_input_grad[2]:
            dropped = torch.ops.aten.native_dropout_backward(x, mask, keep)  # (..., in)
            grad_a = torch.mm(grad_h.t(), dropped.reshape(-1, dropped.shape[-1]))  # (r, in)
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_dropout_backward(
                torch.mm(grad_h, a).view(x.shape), mask, keep
            )  # (..., in)
        return grad_x, grad if ctx.needs_input_grad[1] else None, grad_a, grad_b, None, None


# --------------------------------------------------------------------------- the layer
class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank (optionally weight-decomposed) update.

    ``forward(x) = base(x) + s * B A dropout(x)`` (LoRA), or with DoRA
    ``m / ||W + s B A||_row * (W x + s B A dropout(x)) + bias``. While merged, only
    ``base(x)`` runs.

    Args:
        base: The layer to adapt (``nn.Linear``, ``Conv1D`` or a 4-bit linear layer). It
            is kept as ``self.base`` and never modified except by :meth:`merge`.
        r: Rank.
        alpha: Scaling numerator.
        dropout: Dropout probability on the adapter's input.
        use_dora: Add the DoRA magnitude vector.
        use_rslora: Scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        in_f, out_f = layer_features(base)
        device, dtype = base.weight.device, _param_dtype(base)
        self.r = r
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout_p = float(dropout)
        self.lora_a = nn.Parameter(torch.empty(r, in_f, device=device, dtype=dtype))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(out_f, r, device=device, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # what nn.Linear does for its weight
        names = ["lora_a", "lora_b"]
        if use_dora:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(dense_weight(base).to(dtype), dim=1)  # (out,)
            self.magnitude = nn.Parameter(norm.to(device))
            names.append("magnitude")
        else:
            self.magnitude = None
        self.merged = False
        self._merge_factor: torch.Tensor | None = None  # DoRA: m / ||W + sBA|| used by the merge
        self.train(base.training)  # a model in eval mode stays in eval mode
        declare_trainable(self, names)

    # -- conveniences: look like the layer we wrap ---------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads ``layer.weight.dtype`` keeps working)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return getattr(self.base, "bias", None)

    @property
    def in_features(self) -> int:
        """Input width."""
        return self.lora_a.shape[1]

    @property
    def out_features(self) -> int:
        """Output width."""
        return self.lora_b.shape[0]

    def extra_repr(self) -> str:
        """Rank, scale, dropout, DoRA, merged state."""
        dora = ", dora" if self.magnitude is not None else ""
        return f"r={self.r}, scale={self.scale:g}, dropout={self.dropout_p:g}{dora}, merged={self.merged}"

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        """Base output plus the adapter path (skipped while merged)."""
        result = self.base(x)  # (..., out)
        if self.merged:
            return result
        a, b = self.lora_a, self.lora_b
        out_dtype = result.dtype
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else a.dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        p = self.dropout_p if self.training else 0.0
        if self.magnitude is not None:
            out = self._dora(x, result, p)
        else:
            if result.dtype != dtype:
                result = result.to(dtype)
            if p > 0.0:
                if a.dtype != dtype:
                    a, b = a.to(dtype), b.to(dtype)
                if autocast:
                    with torch.autocast(device_type, enabled=False):
                        out = _DroppedLowRank.apply(x, result, a, b, p, self.scale)
                else:
                    out = _DroppedLowRank.apply(x, result, a, b, p, self.scale)
            else:
                h = F.linear(x, a)  # (..., r)
                # result + scale * h @ B^T in one fused kernel: no separate scale and add passes
                out = torch.addmm(
                    result.reshape(-1, result.shape[-1]), h.reshape(-1, self.r), b.t(), alpha=self.scale
                ).view(result.shape)  # (..., out)
        return out if out.dtype == out_dtype else out.to(out_dtype)

    def _dora(self, x: torch.Tensor, result: torch.Tensor, p: float) -> torch.Tensor:
        a, b = self.lora_a, self.lora_b
        with torch.no_grad():  # ||W + s B A||_row, a constant for the gradient (DoRA, section 4.3)
            weight = dense_weight(self.base).to(a.dtype)  # (out, in)
            norm = torch.linalg.vector_norm(torch.addmm(weight, b, a, alpha=self.scale), dim=1)  # (out,)
        g = self.magnitude / norm  # (out,)
        if p > 0.0:
            x = F.dropout(x, p, True)
        low_rank = F.linear(F.linear(x, a), b) * self.scale  # (..., out)
        bias = self.bias
        linear = result if bias is None else result - bias  # W x, (..., out)
        # m/||.|| * (W x + s B A x) + bias, written so that g == 1 returns base(x) exactly
        return result + (g - 1) * linear + g * low_rank

    # -- merging ---------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` as an ``(out, in)`` tensor in the adapter's dtype."""
        return (self.lora_b @ self.lora_a) * self.scale

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in)`` weight this layer computes with, adapter folded in, as a new tensor.

        Works for 4-bit bases (dequantized) and for layers already merged (their base
        weight is returned). The live layer is not modified.
        """
        with torch.no_grad():
            weight = dense_weight(self.base).to(dtype)  # (out, in)
            if self.merged:
                return weight.clone()
            combined = weight + self.delta_weight().to(dtype)
            if self.magnitude is not None:
                norm = torch.linalg.vector_norm(combined, dim=1)  # (out,)
                combined = combined * (self.magnitude.to(dtype) / norm).unsqueeze(1)
            return combined

    def check_mergeable(self) -> None:
        """Raise ``ValueError`` if :meth:`merge` would fail or produce non-finite weights."""
        if self.merged:
            return
        if not _is_plain(self.base):
            raise ValueError(
                f"cannot merge LoRA into a {type(self.base).__name__} base layer: its weights are quantized "
                "and re-quantizing would lose the update. Use lightning_peft.export_merged(model, dir), which "
                "dequantizes and writes a merged full-precision copy without touching the live model."
            )
        with torch.no_grad():
            weight = dense_weight(self.base)
            new = self.merged_weight(weight.dtype)
            if not bool(torch.isfinite(new).all()):
                raise ValueError(
                    "refusing to merge: the LoRA update is not finite (NaN or inf in lora_a/lora_b/magnitude, "
                    "or an overflow in the base dtype); the base weights were left untouched"
                )

    def merge(self) -> None:
        """Fold the update into the base weight in place (no-op if already merged)."""
        if self.merged:
            return
        self.check_mergeable()
        with torch.no_grad():
            weight = dense_weight(self.base)  # (out, in) view of the parameter
            if self.magnitude is None:
                weight.add_(self.delta_weight().to(weight.dtype))
            else:
                combined = weight.float() + self.delta_weight().float()
                factor = self.magnitude.float() / torch.linalg.vector_norm(combined, dim=1)  # (out,)
                weight.copy_(combined * factor.unsqueeze(1))
                self._merge_factor = factor
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update again (no-op if not merged); exact up to float rounding."""
        if not self.merged:
            return
        with torch.no_grad():
            weight = dense_weight(self.base)
            if self.magnitude is None:
                weight.sub_(self.delta_weight().to(weight.dtype))
            else:
                original = weight.float() / self._merge_factor.unsqueeze(1) - self.delta_weight().float()
                weight.copy_(original)
                self._merge_factor = None
        self.merged = False


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(qualified_name, layer)`` for every :class:`LoRALinear` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


# --------------------------------------------------------------------------- the method
_PEFT_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def _check_names(value: Any, what: str, allow_all_linear: bool) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value == "all-linear" and not allow_all_linear:
            raise ValueError(f"{what}='all-linear' is only allowed for target_modules; give names or a regex")
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ValueError(
        f"{what} must be a regular expression string, a non-empty list of module names"
        f"{', or all-linear' if allow_all_linear else ''}; got {value!r}"
    )


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
    matched against the full module name, or a list of names (full or trailing components,
    e.g. ``["q_proj", "v_proj"]``)."""
    exclude_modules: str | list[str] | None = None
    """Layers to leave alone, in the same forms as ``target_modules`` (except ``"all-linear"``)."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output row, with the direction normalized."""
    use_rslora: bool = False
    """rsLoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    modules_to_save: list[str] | None = None
    """Modules (same matching as ``target_modules``) whose every parameter trains and is saved."""

    name = "lora"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer (e.g. 8 or 16), got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a positive number (commonly 2 * r), got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"LoRA dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1) (0 disables it), got {self.dropout!r}")
        self.target_modules = _check_names(self.target_modules, "target_modules", True)
        if self.target_modules is None:
            raise ValueError("target_modules is required: 'all-linear', a regex, or a list of names")
        self.exclude_modules = _check_names(self.exclude_modules, "exclude_modules", False)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = _check_names(self.modules_to_save, "modules_to_save", False)
        for flag in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    @property
    def scale(self) -> float:
        """The factor the update is multiplied by."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    # -- apply -----------------------------------------------------------------------------
    def _apply(self, model: nn.Module) -> None:
        chosen = select_modules(model, self.target_modules, self.exclude_modules, skip=(LoRALinear,))
        wrapped = [name for name, module in chosen if isinstance(module, LoRALinear)]
        if wrapped:
            raise ValueError(
                f"layers {wrapped} already carry LoRA; build a fresh model to change the adapter"
            )
        saved: list[tuple[str, nn.Module]] = []
        if self.modules_to_save:
            saved = select_modules(model, self.modules_to_save, types=(nn.Module,))
            targets = [name for name, _ in chosen]
            overlap = [s for s, _ in saved for t in targets if t == s or t.startswith(s + ".")]
            if overlap:
                raise ValueError(
                    f"modules_to_save {sorted(set(overlap))} contain layers LoRA adapts; a module either "
                    "trains fully (modules_to_save) or gets LoRA (target_modules): use exclude_modules"
                )
        for name, module in chosen:
            layer = LoRALinear(module, self.r, self.alpha, self.dropout, self.use_dora, self.use_rslora)
            replace_module(model, name, layer)
        for _, module in saved:
            declare_trainable(module)

    def merge(self, model: nn.Module) -> None:
        """Fold every LoRA update of ``model`` into its base weights (checks all layers first).

        Raises:
            ValueError: If any layer has a non-finite update or a quantized base; then no
                layer is changed.
        """
        layers = [layer for _, layer in lora_layers(model)]
        for layer in layers:
            layer.check_mergeable()
        for layer in layers:
            layer.merge()

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge` on every LoRA layer of ``model``."""
        for _, layer in lora_layers(model):
            layer.unmerge()

    # -- Hugging Face PEFT format ----------------------------------------------------------
    def to_peft(self, model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(adapter_config, state_dict)`` in PEFT's LoRA format, names relative to the HF model.

        The state dict holds ``<layer>.lora_A.weight`` (r, in), ``<layer>.lora_B.weight``
        (out, r), ``<layer>.lora_magnitude_vector`` (out,) for DoRA, and every parameter of
        the modules saved in full (``modules_to_save`` and trainable task heads) under its
        plain name.
        """
        backbone = find_backbone(model)
        prefix = backbone_prefix(model)
        layers = lora_layers(backbone)
        if not layers:
            raise ValueError("to_peft: the model has no LoRA layers; apply LoRA first")
        state: dict[str, torch.Tensor] = {}
        conv1d = False
        for name, layer in layers:
            conv1d |= Conv1D is not None and isinstance(layer.base, Conv1D)
            state[f"{name}.lora_A.weight"] = layer.lora_a.detach()
            state[f"{name}.lora_B.weight"] = layer.lora_b.detach()
            if layer.magnitude is not None:
                state[f"{name}.lora_magnitude_vector"] = layer.magnitude.detach()
        saved = self._saved_module_names(model, backbone, prefix)
        for module_name in saved:
            for pname, param in backbone.get_submodule(module_name).named_parameters():
                state[f"{module_name}.{pname}"] = param.detach()
        config = {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": _peft_targets(backbone, [n for n, _ in layers]),
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "modules_to_save": saved or None,
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "init_lora_weights": True,
            "inference_mode": True,
            "task_type": next(
                (t for suffix, t in _PEFT_TASKS if type(backbone).__name__.endswith(suffix)), None
            ),
            "base_model_name_or_path": getattr(getattr(backbone, "config", None), "_name_or_path", None)
            or None,
        }
        return config, state

    def _saved_module_names(self, model: nn.Module, backbone: nn.Module, prefix: str) -> list[str]:
        """Backbone-relative names of modules whose every parameter trains (PEFT's modules_to_save)."""
        trainable = {id(p) for _, p in trainable_named_parameters(model)}
        names: list[str] = []
        candidates = []
        if self.modules_to_save:
            candidates += [n for n, _ in select_modules(backbone, self.modules_to_save, types=(nn.Module,))]
        from ..targeting import head_module_names

        candidates += [n[len(prefix) :] for n in head_module_names(model) if n.startswith(prefix)]
        for name in candidates:
            params = list(backbone.get_submodule(name).parameters())
            if (
                params
                and all(id(p) in trainable for p in params)
                and not any(name.startswith(other + ".") for other in names)
            ):
                if name not in names:
                    names.append(name)
        return names

    def from_peft(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a PEFT LoRA state dict to this model's parameter names.

        Raises:
            ValueError: If a key has no counterpart in ``model``.
        """
        prefix = backbone_prefix(model)
        ours = dict(model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            name = key.removeprefix("base_model.model.")
            for peft_part, our_part in (
                (".lora_A.default.weight", ".lora_a"),
                (".lora_B.default.weight", ".lora_b"),
                (".lora_A.weight", ".lora_a"),
                (".lora_B.weight", ".lora_b"),
                (".lora_magnitude_vector.default.weight", ".magnitude"),
                (".lora_magnitude_vector.weight", ".magnitude"),
                (".lora_magnitude_vector", ".magnitude"),
            ):
                if name.endswith(peft_part):
                    name = name[: -len(peft_part)] + our_part
                    break
            else:
                name = name.replace(".modules_to_save.default.", ".")
            target = prefix + name
            if target not in ours:
                raise ValueError(
                    f"PEFT key {key!r} maps to {target!r}, which this model does not have; was the adapter "
                    "trained for another architecture or with other target_modules?"
                )
            if tuple(ours[target].shape) != tuple(value.shape):
                raise ValueError(
                    f"PEFT tensor {key!r} has shape {tuple(value.shape)} but {target} is {tuple(ours[target].shape)}"
                )
            out[target] = value
        return out

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> LoRAConfig:
        """Build a :class:`LoRAConfig` from a PEFT ``adapter_config.json`` dict.

        Raises:
            ValueError: For a non-LoRA config or PEFT options this implementation lacks.
        """
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type={config.get('peft_type')!r}")
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
            raise ValueError(f"PEFT LoRA options {bad} are not supported; only plain LoRA/DoRA/rsLoRA are")
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
