"""Build or load a model straight into 4-bit, one layer at a time.

Two ways to never hold a whole model in full precision, for
:class:`lightning_peft.plugins.FourBitPrecision` and plain PyTorch alike:

* :func:`quantize_on_init`: a context under which every linear layer is quantized the
  moment it is attached to its parent (building from a config, ``Trainer.init_module()``,
  ``configure_model``);
* :func:`load_quantized`: build the model with its parameters on ``meta``, then stream
  the safetensors shards one tensor at a time (plain reads, no memory map), quantizing
  each linear weight as it arrives.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from transformers import AutoConfig, AutoModelForCausalLM

try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x keeps it in modeling_utils
    from transformers.modeling_utils import no_init_weights

from ..core.layers import LINEAR_TYPES, is_4bit
from ..core.targeting import HEAD_NAMES, head_module_names, replace_module
from ..hub import MODEL_FILES, local_folder
from ..methods.base import is_applying
from ..progress import library_bars, progress_bar
from .convert import quantizable_modules
from .heap import release_freed_memory
from .kernels import quantize_linear
from .spec import QuantSpec

__all__ = [
    "NoSafetensorsError",
    "iter_safetensors",
    "load_quantized",
    "quantize_on_init",
    "safetensors_files",
]

# --------------------------------------------------------------------------- quantize while building
_ON_INIT_DEPTH = [0]


@contextlib.contextmanager
def quantize_on_init(
    spec: QuantSpec | None = None, skip_modules: Iterable[str] | None = None, *, skip_heads: bool = True
) -> Iterator[None]:
    """Quantize every linear layer the moment it is attached to a parent module.

    Under this context a model of any size is built with at most one layer in full
    precision at a time: each ``nn.Linear``/``Conv1D`` is quantized (its freshly initialized
    weights) when it is assigned to its parent, and the full-precision weight is freed.
    Use it to build a model from a config (``AutoModelForCausalLM.from_config(cfg)``,
    ``Trainer.init_module()``, ``configure_model``); to load trained weights use
    :func:`load_quantized`.

    Never quantized: layers built while a method is applied (adapters, LoRA parts: they
    train), layers on the ``meta`` device, layers attached under a head name
    (``lm_head``, ``classifier``, ``score``, ...) when ``skip_heads``, and layers attached
    under a name in ``skip_modules``. Only the attribute name is known at that moment, so
    ``skip_modules`` entries must be single components (``"down_proj"``, not
    ``"layers.0.mlp.down_proj"``). Quantized weights are marked as initialized so that
    Hugging Face's ``post_init`` leaves them alone (their values are PyTorch's default
    initialization, not the model family's own). Re-entrant.

    Raises:
        ValueError: If a ``skip_modules`` entry has a dot.
    """
    spec = spec or QuantSpec()
    skip = set(skip_modules or ())
    dotted = sorted(s for s in skip if "." in s)
    if dotted:
        raise ValueError(
            f"skip_modules {dotted} name nested modules, which cannot be recognized while a model is being "
            "built (only the attribute name is known then). Use trailing components such as 'down_proj', or "
            "build the model outside the init context and let convert_module quantize it."
        )
    if skip_heads:
        skip |= set(HEAD_NAMES)
    if _ON_INIT_DEPTH[0]:
        yield
        return

    def hook(parent: nn.Module, name: str, child: nn.Module | None) -> nn.Module | None:
        if not isinstance(child, LINEAR_TYPES) or is_4bit(child) or name in skip:
            return None
        if child.weight.device.type == "meta" or is_applying():
            return None
        layer = quantize_linear(child, **spec.layer_kwargs())
        layer.weight._is_hf_initialized = True
        layer.train(child.training)
        return layer

    handle = register_module_module_registration_hook(hook)
    _ON_INIT_DEPTH[0] += 1
    try:
        yield
    finally:
        _ON_INIT_DEPTH[0] -= 1
        handle.remove()


# --------------------------------------------------------------------------- streaming load
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a ``.safetensors`` file, reading one tensor at a time.

    Plain reads into freshly allocated tensors, no memory map: only the tensor being
    yielded (and whatever the caller keeps) occupies memory.
    """
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            raw = torch.empty(end - start, dtype=torch.uint8, device="cpu")  # whatever device context is on
            f.seek(8 + size + start)
            if end > start and f.readinto(memoryview(raw.numpy())) != end - start:
                raise ValueError(f"{path}: truncated data for tensor {name}")
            yield name, raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class NoSafetensorsError(FileNotFoundError):
    """A model folder without safetensors weights (streaming loads read safetensors only)."""


def safetensors_files(folder: str | os.PathLike) -> list[str]:
    """The weight files of a ``save_pretrained`` folder (sharded or not), in order."""
    folder = os.fspath(folder)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise NoSafetensorsError(
        f"{folder} has no model.safetensors or model.safetensors.index.json; streaming 4-bit loading reads "
        "safetensors only (re-save with model.save_pretrained(dir), which writes safetensors by default)"
    )


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on ``meta`` (no memory) while buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _no_init() -> contextlib.AbstractContextManager:
    """Skip weight initialization while building the skeleton (every parameter is loaded later)."""
    return no_init_weights()


def _release_freed_memory() -> None:
    """Give freed memory back to the OS.

    glibc raises its mmap threshold after large frees, so later tensors of that size come
    from the heap, and freed heap pages stay resident: without this, a streaming load's
    resident memory creeps up by hundreds of MB (more on some runs than others).
    """
    release_freed_memory()


def load_quantized(
    source: str | os.PathLike,
    auto_class: Any = None,
    config: Any = None,
    *,
    spec: QuantSpec | None = None,
    dtype: torch.dtype | str | None = torch.bfloat16,
    skip_modules: Iterable[str] | None = None,
    skip_heads: bool = True,
    device: torch.device | str = "cpu",
    only: Iterable[str] | None = None,
    **config_kwargs: Any,
) -> nn.Module:
    """Load a local Hugging Face folder into a model whose linear layers are 4-bit, streaming.

    The model is built with its parameters on ``meta``; then the safetensors shards are
    read one tensor at a time. A linear weight that :func:`quantizable_modules` selects
    is quantized as soon as its tensors arrive; every other tensor is cast to ``dtype`` and
    put in place. Peak memory is the 4-bit model plus the largest single tensor, never
    the full-precision model.

    Args:
        source: A local folder (``config.json`` + ``*.safetensors``), a hub id (fetched
            into the Hugging Face cache; ``HF_HUB_OFFLINE=1`` reads only the cache), or
            ``"embedded:all-MiniLM-L6-v2"``.
        auto_class: A transformers auto class or model class (default
            ``AutoModelForCausalLM``).
        config: A ``PretrainedConfig`` (default: read from ``source``).
        spec: Quantization settings (default NF4, double quantization, bf16 compute).
        dtype: dtype of the tensors that stay in full precision (embeddings, norms, heads),
            and of the weights before they are quantized. ``"auto"`` (or ``None``) takes the
            config's ``dtype`` if it has one, else the checkpoint's first floating dtype, as
            ``from_pretrained(..., dtype="auto")`` does.
        skip_modules: Module names or trailing components kept in full precision.
        skip_heads: Keep output heads in full precision.
        device: Where the model ends up (and where layers are quantized).
        only: If given, quantize only the layers with these names (of those the rules
            above select); the others load in ``dtype``. For layers a fine-tuning method
            will train (see ``CausalLM``'s loading under ``FourBitPrecision``).
        **config_kwargs: Overrides for the config (e.g. ``num_labels=2``).

    Returns:
        The model in eval mode, every parameter frozen. Heads the checkpoint lacks (a new
        classifier) are freshly initialized, as ``from_pretrained`` does.

    Raises:
        FileNotFoundError: If ``source`` is neither a folder nor a hub id that can be fetched,
            or holds no safetensors weights.
        ValueError: If the checkpoint lacks tensors the model needs.
    """
    with library_bars():
        folder = local_folder(source, what="model", allow_patterns=MODEL_FILES)
    files = safetensors_files(folder)
    spec = spec or QuantSpec()
    auto_class = auto_class or AutoModelForCausalLM
    if config is None:
        config = AutoConfig.from_pretrained(folder, **config_kwargs)
    else:
        for key, value in config_kwargs.items():
            setattr(config, key, value)
    dtype = _resolve_dtype(dtype, config, files)
    device = torch.device(device)
    with _parameters_on_meta(), _no_init():
        model = auto_class.from_config(config) if hasattr(auto_class, "from_config") else auto_class(config)
    model.requires_grad_(False)
    targets = {
        name: module for name, module in quantizable_modules(model, skip_modules, skip_heads=skip_heads)
    }
    if only is not None:
        keep = set(only)
        targets = {name: module for name, module in targets.items() if name in keep}
    slots = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    slots |= {n for n, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unexpected: list[str] = []
    bar = progress_bar(desc="Loading into 4-bit", total=len(targets), unit="layer")
    for path in files:
        for key, tensor in iter_safetensors(path):
            name = _match_key(key, slots, prefix)
            if name is None:
                unexpected.append(key)
                continue
            owner_name, _, attr = name.rpartition(".")
            if owner_name in targets:
                parts = pending.setdefault(owner_name, {})
                parts[attr] = tensor
                layer = targets[owner_name]
                if "weight" in parts and ("bias" in parts or getattr(layer, "bias", None) is None):
                    _fill(layer, parts, dtype, torch.device("cpu"))
                    new = quantize_linear(layer, device=device, **spec.layer_kwargs())
                    replace_module(model, owner_name, new)
                    del pending[owner_name], parts, layer, targets[owner_name]
                    bar.update()
                    _release_freed_memory()  # else the heap keeps the freed full-precision layers
                continue
            owner = model.get_submodule(owner_name) if owner_name else model
            _fill(owner, {attr: tensor}, dtype, device)
    bar.close()
    if pending:
        raise ValueError(
            f"checkpoint has incomplete linear layers (weight without bias?): {sorted(pending)[:5]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _finish_missing(model, dtype, device, unexpected)
    _release_freed_memory()
    return model.to(device).eval()


def _resolve_dtype(dtype: torch.dtype | str | None, config: Any, files: list[str]) -> torch.dtype:
    """``dtype``, or for ``"auto"``/``None`` the config's dtype, else the checkpoint's first float dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype, its name, or 'auto'; got {dtype!r}")
        return resolved
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared.removeprefix("torch."), None)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        return declared
    for path in files:
        for info in _header(path).values():
            stored = _ST_DTYPES.get(info["dtype"])
            if stored is not None and stored.is_floating_point:
                return stored
    return torch.get_default_dtype()


def _header(path: str | os.PathLike) -> dict[str, Any]:
    """The tensor entries of a ``.safetensors`` header (name -> dtype, shape, offsets)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _match_key(key: str, slots: set[str], prefix: str) -> str | None:
    """Map a checkpoint key to the model's name for it (base-model prefix added or removed)."""
    if key in slots:
        return key
    if prefix and f"{prefix}.{key}" in slots:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in slots:
        return key[len(prefix) + 1 :]
    return None


def _fill(
    module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> None:
    """Put loaded tensors into ``module`` as frozen parameters / buffers (floats cast to ``dtype``)."""
    for attr, tensor in tensors.items():
        if attr in module._parameters:
            old = module._parameters[attr]
            if old is not None and tuple(old.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{type(module).__name__}.{attr}: checkpoint shape {tuple(tensor.shape)}, model {tuple(old.shape)}"
                )
            value = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = tensor.to(device)


def _finish_missing(
    model: nn.Module, dtype: torch.dtype, device: torch.device, unexpected: list[str]
) -> None:
    """Initialize heads the checkpoint lacks; raise for anything else still on ``meta``."""
    heads = head_module_names(model)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    fresh = [n for n in missing if any(n == h or n.startswith(h + ".") for h in heads)]
    absent = sorted(set(missing) - set(fresh))
    if absent:
        hint = f"; the checkpoint had unmatched keys {unexpected[:5]}" if unexpected else ""
        raise ValueError(f"the checkpoint lacks {len(absent)} tensor(s) the model needs: {absent[:5]}{hint}")
    init = getattr(model, "_init_weights", None)
    for head in {n.rpartition(".")[0] for n in fresh}:
        module = model.get_submodule(head)
        module.to_empty(device=device, recurse=False)
        if callable(init):
            init(module)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
        for name, param in module.named_parameters(recurse=False):
            module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
