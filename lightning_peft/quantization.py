"""4-bit base weights for QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

The functional core behind :class:`lightning_peft.plugins.FourBitPrecision`, in plain torch
plus bitsandbytes: replace frozen linear layers by 4-bit ones (NF4 or FP4 codes in blocks
of 64 weights, optionally with the per-block scales quantized again: "double
quantization"), read a dense weight back from any supported layer, and count the bits a
quantized model holds.

bitsandbytes' CPU backend repacks a 4-bit weight in place the first time a layer runs in
eval mode under ``no_grad`` on a CPU with AVX512-BF16 (new layout, scales cast to bf16);
``dequantize_4bit`` then returns wrong values. Layers made here never repack
(:class:`Linear4bit`), and :func:`dense_weight` reads repacked layers made elsewhere
correctly.

Building and loading models straight into 4-bit (``quantize_on_init``,
``load_quantized``) lives in :mod:`lightning_peft.streaming` and is re-exported here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .methods.base import trainable_named_parameters
from .targeting import LINEAR_TYPES, head_module_names, replace_module

try:  # transformers' GPT-2 style linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = None  # type: ignore[assignment,misc]

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the per-block scales in blocks of 256


def _import_bnb() -> Any:
    """Import bitsandbytes quietly (its CPU build warns about an optional ``kernels`` package)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.getLogger("bitsandbytes").level
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional  # noqa: F401
        finally:
            logging.getLogger("bitsandbytes").setLevel(previous)
    return bnb


bnb = _import_bnb()


# --------------------------------------------------------------------------- layers
def _dequantize_state(data: torch.Tensor, state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize packed 4-bit ``data`` with its ``QuantState`` into a new ``(out, in)`` tensor."""
    if getattr(state, "packing_format_for_cpu", False):  # the repack set dtype to bf16
        return _dequantize_cpu_packed(data, state).to(dtype or getattr(state, "original_dtype", state.dtype))
    dtype = dtype or state.dtype
    op = getattr(getattr(torch.ops, "bitsandbytes", None), "dequantize_4bit", None)
    if data.device.type != "cpu" or op is None:
        return bnb.functional.dequantize_4bit(data, state).to(dtype)
    absmax = state.absmax  # (blocks,)
    if state.nested:  # 8-bit scales of the scales, in blocks of 256; index_select is fast on CPU
        inner = state.state2
        codes = torch.index_select(inner.code, 0, absmax.int())  # (blocks,)
        scales = inner.absmax.repeat_interleave(inner.blocksize)[: codes.numel()]  # (blocks,)
        absmax = codes * scales + state.offset
    return op.default(data, absmax.float(), state.blocksize, state.quant_type, state.shape, dtype)


class _Matmul4bit(torch.autograd.Function):
    """``x @ W.T`` with ``W`` dequantized in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # noqa: D102
        ctx.weight, ctx.dtype = weight, dtype
        dense = _dequantize_state(weight.data, weight.quant_state, dtype)  # (out, in)
        return torch.nn.functional.linear(x, dense)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None
        dense = _dequantize_state(ctx.weight.data, ctx.weight.quant_state, grad.dtype)  # (out, in)
        return grad @ dense, None, None  # (..., in)


class Linear4bit(bnb.nn.Linear4bit):
    """A bitsandbytes ``Linear4bit`` that never repacks its weight and never casts its bias in place.

    Differences from the parent class, all in :meth:`forward`:

    * no CPU repacking in eval mode, so the stored codes stay the ones
      ``quantize_4bit`` produced (bit-identical checkpoints and fingerprints, exact
      dequantization, the same bits per weight in training and evaluation);
    * the bias is cast to the compute dtype for the add but kept as it is, so a trainable
      fp32 bias stays fp32 for its optimizer;
    * on CPU the weight is dequantized straight into ``compute_dtype`` (a fast path for
      double-quantized scales), in forward and again in backward; on CUDA bitsandbytes'
      kernels run;
    * the output has the input's dtype, the matmul runs in ``compute_dtype``.
    """

    source_type: str = "Linear"
    """``"Linear"`` or ``"Conv1D"``: what the layer was before quantization (for export)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.support_avx512bf16_for_cpu = False  # the switch the parent's repack reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        """``x @ W.T + b`` with ``W`` dequantized on the fly in ``compute_dtype``."""
        bnb.nn.modules.fix_4bit_weight_quant_state_from_module(self)
        state = self.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by someone else: undo
            self.weight.data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                self.weight.data, state
            )
            self.weight.quant_state = self.quant_state = state
        dtype = self.compute_dtype or x.dtype
        h = x.to(dtype)
        if h.device.type == "cpu":
            out = _Matmul4bit.apply(h, self.weight, dtype)  # (..., out)
        else:
            out = bnb.matmul_4bit(h, self.weight.t(), quant_state=state)  # (..., out)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (ours or anyone's)."""
    return isinstance(module, bnb.nn.Linear4bit)


def quantize_linear(
    module: nn.Module,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.bfloat16,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
    device: torch.device | str | None = None,
) -> Linear4bit:
    """Return a 4-bit copy of a frozen ``nn.Linear`` or transformers ``Conv1D``.

    The weight is quantized in ``(out, in)`` orientation (``Conv1D`` is transposed first).
    The bias, if any, is copied unchanged and frozen. Quantizing the same weights twice
    gives bit-identical codes and scales.

    Args:
        module: The layer to quantize.
        quant_type: ``"nf4"`` (normal float, the QLoRA default) or ``"fp4"``.
        double_quant: Quantize the per-block fp32 scales again to 8 bits.
        compute_dtype: dtype the matmul runs in (``None``: the input's dtype).
        blocksize: Weights per quantization block.
        quant_storage: dtype the packed codes are stored as (``uint8``; a float dtype lets
            FSDP shard them like any other parameter).
        device: Where to quantize (default: the weight's device; ``meta`` is not allowed).

    Returns:
        The new :class:`Linear4bit`; the caller swaps it in.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    weight = dense_weight(module)  # (out, in)
    device = torch.device(device) if device is not None else weight.device
    if device.type == "meta":
        raise ValueError("cannot quantize a layer on the meta device: load its weights first")
    out_features, in_features = weight.shape
    bias = getattr(module, "bias", None)
    layer = Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach().to(device).contiguous(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=layer,
    )._quantize(device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
    layer.source_type = "Conv1D" if Conv1D is not None and isinstance(module, Conv1D) else "Linear"
    return layer


# --------------------------------------------------------------------------- dequantization
def _dequantize_cpu_packed(data: torch.Tensor, state: Any) -> torch.Tensor:
    """Dequantize a weight bitsandbytes repacked for its AVX512-BF16 CPU kernel, without touching it."""
    n, k_half = data.shape  # data: (N, K/2) uint8, columns interleaved in tiles of 32 rows
    k, tile = 2 * k_half, 32
    packed = data.reshape(-1, tile)
    codes = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)  # (N*K/64, 64)
    codes = codes.reshape(n // tile, k_half, tile, 2).transpose(1, 2).reshape(n, k)  # (N, K)
    values = state.code.to(data.device)[codes.long()]  # (N, K)
    scales = state.absmax.T.float()  # (N, K / blocksize)
    out = values.view(n, k // state.blocksize, state.blocksize) * scales.unsqueeze(-1)
    return out.reshape(n, k)


def _dequantize(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise ValueError(f"{type(module).__name__} has no quantization state: it was never quantized")
    return _dequantize_state(weight.data, state)  # (out, in)


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out, in)`` dense weight of a linear layer, whatever its storage.

    * ``nn.Linear``: its weight (detached; it may share storage: clone before editing);
    * transformers ``Conv1D`` (weight stored ``(in, out)``): the transpose;
    * bitsandbytes ``Linear4bit`` (ours or one loaded by transformers/PEFT): a new
      dequantized tensor, correct even after bitsandbytes repacked it for its CPU kernel.

    Args:
        module: The layer.
        dtype: Cast the result to this dtype (default: the stored / original dtype).

    Returns:
        The weight, shape ``(out_features, in_features)``.

    Raises:
        TypeError: For any other module type.
    """
    if is_quantized(module):
        weight = _dequantize(module)
    elif Conv1D is not None and isinstance(module, Conv1D):
        weight = module.weight.detach().T  # stored (in, out)
    elif isinstance(module, nn.Linear):
        weight = module.weight.detach()
    else:
        allowed = ", ".join(t.__name__ for t in (*LINEAR_TYPES, bnb.nn.Linear4bit))
        raise TypeError(f"dense_weight supports {allowed}; got {type(module).__name__}")
    return weight if dtype is None else weight.to(dtype)


def plain_layer(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A full-precision layer equal to ``module``: an ``nn.Linear``, or a ``Conv1D`` if it came from one.

    For a 4-bit layer the weight is dequantized; the result is frozen like the input was.
    """
    weight = dense_weight(module, dtype)  # (out, in)
    out_features, in_features = weight.shape
    bias = getattr(module, "bias", None)
    if getattr(module, "source_type", None) == "Conv1D" or (
        Conv1D is not None and isinstance(module, Conv1D)
    ):
        layer: nn.Module = Conv1D(out_features, in_features)
        layer.weight = nn.Parameter(weight.T.contiguous().clone(), requires_grad=False)  # (in, out)
    else:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype or bias.dtype).clone(), requires_grad=False)
    return layer


# --------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How base weights are quantized (validated on construction)."""

    quant_type: str = "nf4"
    """4-bit code book: ``"nf4"`` (normal float, best for normally distributed weights) or ``"fp4"``."""
    double_quant: bool = True
    """Quantize the fp32 per-block scales again to 8 bits (saves ~0.37 bits per weight)."""
    compute_dtype: torch.dtype = torch.bfloat16
    """dtype the 4-bit matmuls run in: ``torch.bfloat16``, ``torch.float16`` or ``torch.float32``."""
    blocksize: int = 64
    """Weights per quantization block (one scale each): a power of two from 64 to 4096."""
    quant_storage: torch.dtype = torch.uint8
    """dtype the packed codes are stored as (``uint8``; a float dtype for sharding strategies)."""

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be True or False, got {self.double_quant!r}")
        dtype = as_dtype(self.compute_dtype)
        if dtype not in COMPUTE_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in COMPUTE_DTYPES)
            raise ValueError(f"compute_dtype must be a floating dtype ({names}), got {self.compute_dtype!r}")
        object.__setattr__(self, "compute_dtype", dtype)
        if isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        storage = as_dtype(self.quant_storage)
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {self.quant_storage!r}")
        object.__setattr__(self, "quant_storage", storage)

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`quantize_linear` for these settings."""
        return {
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
            "blocksize": self.blocksize,
            "quant_storage": self.quant_storage,
        }


COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
STORAGE_DTYPES = (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32)


def as_dtype(value: torch.dtype | str) -> torch.dtype | str:
    """``torch.bfloat16`` from ``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``"bf16"``."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}.get(name, name)
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return value


# --------------------------------------------------------------------------- which layers
def _matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` or one of its ancestors equals a pattern or ends with ``"." + pattern``."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(p == pat or p.endswith("." + pat) for p in prefixes for pat in patterns)


def _trainable_ids(model: nn.Module) -> set[int]:
    ids = {id(p) for _, p in trainable_named_parameters(model)}
    ids.update(id(p) for p in model.parameters() if p.requires_grad)
    return ids


def quantizable_modules(
    model: nn.Module, skip_modules: Iterable[str] | None = None, *, skip_heads: bool = True
) -> list[tuple[str, nn.Module]]:
    """The layers :func:`quantize_model` replaces, as ``(qualified_name, module)`` pairs.

    A layer qualifies if it is an ``nn.Linear`` or ``Conv1D`` (not already 4-bit) and
    none of these holds: one of its parameters is trainable (declared with
    :func:`~lightning_peft.methods.base.declare_trainable`, or ``requires_grad``); its
    weight is shared with another module (tied embeddings); it is, or lies inside, an
    output head (:func:`~lightning_peft.targeting.head_module_names`, when ``skip_heads``)
    or a module named in ``skip_modules`` (full names or trailing components).
    Frozen base layers wrapped by a method (``LoRALinear.base``) qualify.
    """
    skip = list(skip_modules or ())
    if skip_heads:
        skip += head_module_names(model)
    trainable = _trainable_ids(model)
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    chosen = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, LINEAR_TYPES) or is_quantized(module):
            continue
        params = list(module.parameters(recurse=False))
        if any(id(p) in trainable for p in params) or owners.get(id(module.weight), 0) > 1:
            continue
        if skip and _matches(name, skip):
            continue
        chosen.append((name, module))
    return chosen


def quantize_model(
    model: nn.Module,
    spec: QuantSpec | None = None,
    *,
    skip_modules: Iterable[str] | None = None,
    skip_heads: bool = True,
    device: torch.device | str | None = None,
) -> list[str]:
    """Replace the frozen linear layers of ``model`` by 4-bit ones, one layer at a time, in place.

    Only one layer's full-precision weight is alive at a time beyond what ``model`` held.
    The layers chosen are :func:`quantizable_modules`'s.

    Args:
        model: Any ``nn.Module`` (methods may already be applied).
        spec: Quantization settings (default :class:`QuantSpec()`: NF4, double quant, bf16).
        skip_modules: Extra module names (or trailing components) to keep in full precision.
        skip_heads: Keep output heads in full precision.
        device: Where to quantize and keep each layer (default: where its weight is).

    Returns:
        Qualified names of the layers replaced.

    Raises:
        ValueError: If a layer to quantize is still on the ``meta`` device.
    """
    spec = spec or QuantSpec()
    names = []
    for name, module in quantizable_modules(model, skip_modules, skip_heads=skip_heads):
        if module.weight.device.type == "meta":
            raise ValueError(f"layer {name} is on the meta device; load its weights before quantizing")
        layer = quantize_linear(module, device=device, **spec.layer_kwargs())
        layer.train(module.training)
        replace_module(model, name, layer)
        del module
        names.append(name)
    return names


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every 4-bit layer of ``model`` by its full-precision equivalent, in place.

    ``Conv1D`` layers come back as ``Conv1D``. Returns the names of the layers replaced.
    """
    names = [n for n, m in model.named_modules() if n and is_quantized(m)]
    for name in names:
        old = model.get_submodule(name)
        new = plain_layer(old, dtype or getattr(old.weight.quant_state, "dtype", None))
        new.train(old.training)
        replace_module(model, name, new)
    return names


# --------------------------------------------------------------------------- bit counting
def _bits(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size() * 8


def _layer_bits(module: nn.Module) -> tuple[int, int, int]:
    """``(weights represented, bits scaling with them, bits of fixed per-layer tables)``."""
    state = module.weight.quant_state
    n = int(torch.Size(state.shape).numel())
    data = _bits(module.weight.data) + _bits(state.absmax)
    tables = _bits(state.code)
    if getattr(state, "nested", False):
        data += _bits(state.state2.absmax) + _bits(state.offset)
        tables += _bits(state.state2.code)
    return n, data, tables


def quantization_report(model: nn.Module) -> dict[str, float]:
    """Storage of ``model`` split into 4-bit layers and the rest.

    Returns:
        ``quantized_layers``; ``quantized_weights`` (weights the 4-bit layers stand for);
        ``bits_per_quantized_weight`` (packed codes + block scales + second-level scales
        and offset, over those weights); ``table_bits`` (the fixed code books each layer
        carries: 16 NF4/FP4 values and, with double quantization, 256 for the scale code:
        identical in every layer and independent of its size; the saved state dict also
        holds ~170 bytes of JSON metadata per layer, see :func:`state_dict_bits`); ``other_parameters`` and
        ``other_bits`` (every other parameter and persistent buffer, shared tensors
        counted once, 4-bit biases included); ``total_bits``.
    """
    layers = [m for m in model.modules() if is_quantized(m)]
    counted: set[int] = set()
    n_q = data = tables = 0
    for module in layers:
        n, d, t = _layer_bits(module)
        n_q, data, tables = n_q + n, data + d, tables + t
        counted.add(id(module.weight))
    other_n = other_bits = 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False))
        tensors += [
            b
            for name, b in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set
        ]
        for t in tensors:
            if t is None or id(t) in counted:
                continue
            counted.add(id(t))
            other_n += t.numel()
            other_bits += _bits(t)
    return {
        "quantized_layers": len(layers),
        "quantized_weights": n_q,
        "bits_per_quantized_weight": data / n_q if n_q else float("nan"),
        "table_bits": tables,
        "other_parameters": other_n,
        "other_bits": other_bits,
        "total_bits": data + tables + other_bits,
    }


def bits_per_parameter(model: nn.Module) -> float:
    """Bits stored per quantized weight in ``model``'s 4-bit layers.

    Counts the packed 4-bit codes, the per-block scales (8-bit with double quantization,
    else fp32) and the second-level scales and offset, over the number of weights they
    represent: NF4 with double quantization in blocks of 64 gives
    ``4 + 8/64 + 32/(64*256) ~= 4.127`` on large layers, FP4/NF4 without it ``4.5``. The
    fixed code books are reported by :func:`quantization_report`.

    Raises:
        ValueError: If ``model`` has no 4-bit layer.
    """
    report = quantization_report(model)
    if not report["quantized_layers"]:
        raise ValueError(f"{type(model).__name__} has no 4-bit layer")
    return report["bits_per_quantized_weight"]


def state_dict_bits(model: nn.Module) -> int:
    """Bits of ``model.state_dict()`` as saved (4-bit layers in bitsandbytes' format), shared tensors once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += _bits(t)
    return total


# --------------------------------------------------------------------------- merge cost
def _spec_of(layer: nn.Module) -> QuantSpec:
    weight = layer.weight
    return QuantSpec(
        quant_type=weight.quant_type,
        double_quant=bool(weight.compress_statistics),
        compute_dtype=layer.compute_dtype or torch.float32,
        blocksize=weight.blocksize,
        quant_storage=weight.quant_storage,
    )


@torch.no_grad()
def requantization_error(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """What folding adapters into the 4-bit base would cost, measured on the logits of ``batch``.

    For every adapted layer over a 4-bit base (a module with a quantized ``base`` and a
    ``merged_weight()``, such as ``LoRALinear``) two copies of the Hugging Face model are
    built: one with the merged weight in full precision (what ``export_merged`` writes),
    one with the merged weight quantized again with the base's settings (what an in-place
    4-bit merge would give). Both are compared with the live model's logits. Needs memory
    for two extra copies of the model; meant for evaluation and benchmarks.

    Returns:
        ``layers``; ``cosine_merged``/``cosine_requantized`` (cosine similarity of the
        flattened logits with the live model's); ``max_abs_merged``/``max_abs_requantized``
        and ``mean_abs_merged``/``mean_abs_requantized`` (absolute logit differences).

    Raises:
        ValueError: If no adapted layer sits on a 4-bit base.
    """
    from .targeting import find_backbone

    backbone = find_backbone(model)
    names = [
        n
        for n, m in backbone.named_modules()
        if is_quantized(getattr(m, "base", None) or nn.Identity())
        and callable(getattr(m, "merged_weight", None))
    ]
    if not names:
        raise ValueError("no adapted layer over a 4-bit base in this model: nothing would be re-quantized")
    was_training = backbone.training
    backbone.eval()

    def logits(net: nn.Module) -> torch.Tensor:
        return net(**batch).logits.float()

    try:
        live = logits(backbone)
        results: dict[str, float] = {"layers": len(names)}
        for kind in ("merged", "requantized"):
            copy_ = copy.deepcopy(backbone)
            for name in names:
                wrapper = copy_.get_submodule(name)
                dtype = wrapper.base.weight.quant_state.dtype  # the base's original dtype
                plain = plain_layer(wrapper.base, dtype)
                merged = wrapper.merged_weight(torch.float32).to(dtype)  # (out, in)
                plain.weight.data = merged.T.contiguous() if isinstance(plain, Conv1D or ()) else merged
                new = (
                    plain
                    if kind == "merged"
                    else quantize_linear(plain, **_spec_of(wrapper.base).layer_kwargs())
                )
                replace_module(copy_, name, new)
            other = logits(copy_)
            del copy_
            results[f"cosine_{kind}"] = float(
                torch.nn.functional.cosine_similarity(live.flatten(), other.flatten(), 0)
            )
            results[f"max_abs_{kind}"] = float((live - other).abs().max())
            results[f"mean_abs_{kind}"] = float((live - other).abs().mean())
        return results
    finally:
        backbone.train(was_training)


def __getattr__(name: str) -> Any:
    # the streaming helpers live in .streaming (which imports this module); exposed here too
    if name in ("load_quantized", "quantize_on_init", "iter_safetensors"):
        from . import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
