"""The Hugging Face PEFT adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What each method writes and reads is its own contract hooks (``to_peft``, ``from_peft``,
``from_peft_config``, ``peft_types``); this module does the folders. Several adapters use
PEFT's own layout: the adapter named ``default`` at the root, every other one in a
subfolder named after it, as ``PeftModel.save_pretrained`` writes them and
``PeftModel.from_pretrained(base, dir, adapter_name=...)`` / ``load_adapter`` read them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.pooling import refuse_pooled_export
from ..core.sharded import gathered_copy, unwrapped_name
from ..core.targeting import find_backbone
from ..hub import embedded_hub_id, local_folder
from ..methods.base import Method, MethodError, applied_methods, registry
from ..progress import progress
from .errors import CorruptDeltaError, DeltaError
from .files import deserialize, replace_atomically, serialize, write_once
from .records import RECORD_VERSION
from .restore import restore
from .state import delta_state_dict, full_parameters

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT = "default"
PROMPT_LEARNING = frozenset({"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"})
"""PEFT types whose adapter files hold ``prompt_embeddings`` as is, without ``base_model.model.``."""

__all__ = ["CONFIG", "WEIGHTS", "base_model_reference", "export_peft", "import_peft", "peft_form"]


def base_model_reference(obj: nn.Module) -> str | None:
    """What ``base_model_name_or_path`` should say: the hub id of the embedded model, else the model's own."""
    config = getattr(find_backbone(obj), "config", None)
    name = getattr(config, "_name_or_path", None) or None
    if name and os.path.isdir(name):
        return embedded_hub_id(name) or name
    return name


def peft_form(obj: nn.Module, method: Method) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, file tensors)`` of one adapter, checked to hold everything it trained.

    Raises:
        MethodError: If the method has no PEFT form (for this model).
        ValueError: If the PEFT form would drop trained tensors.
    """
    config, state = method.to_peft(obj)
    trained = sum(t.numel() for t in delta_state_dict(obj, [method.adapter_name]).values())
    exported = sum(t.numel() for t in state.values())
    if exported < trained:
        raise ValueError(
            f"export_peft: the PEFT form of adapter {method.adapter_name!r} ({method.name}) holds {exported} values "
            f"but {trained} are trained; exporting would lose some of them (a trainable module PEFT does not save)"
        )
    config = {
        key: _unwrapped(value) for key, value in config.items()
    }  # layer names as after an FSDP1 run too
    config = {**config, "base_model_name_or_path": base_model_reference(obj)}
    prompt_learning = config.get("peft_type") in PROMPT_LEARNING
    return config, {
        (name if prompt_learning else PEFT_PREFIX + unwrapped_name(name)): t for name, t in state.items()
    }


def _unwrapped(value: Any) -> Any:
    """A config value with the levels FSDP1 units and checkpoint wrappers add left out of its names."""
    if isinstance(value, str):
        return unwrapped_name(value)
    if isinstance(value, list):
        return [_unwrapped(v) for v in value]
    return value


def export_peft(obj: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write adapters as a Hugging Face PEFT adapter folder.

    With ``adapter_name`` the folder holds that adapter at its root. Without, every adapter
    is written in PEFT's multi-adapter layout (``default`` at the root, the others in
    subfolders by name). ``PeftModel.from_pretrained(base, directory)`` (and vLLM, TGI, ...)
    load the root adapter; ``adapter_name=`` / ``subfolder=`` the others.

    Safe on every rank of a distributed run (DDP, FSDP2, FSDP): every rank gathers, rank 0
    writes, the others wait.

    Raises:
        ValueError: If no adapter is applied or the named one does not exist;
            :class:`~lightning_peft.methods.MethodError` (a ``ValueError``) if a method has no
            PEFT counterpart (its message names what works instead); ``ValueError`` for a
            classifier that pools otherwise than its plain Hugging Face class
            (``SequenceClassifier(pooling="mean")``): PEFT would load it onto one.
    """
    refuse_pooled_export(obj, "export_peft")
    methods = applied_methods(obj)
    if not methods:
        raise ValueError(
            f"export_peft: no method is applied to {type(obj).__name__}; apply one (e.g. LoRA) first"
        )
    names = list(dict.fromkeys(m.adapter_name for m in methods))
    if adapter_name is not None and adapter_name not in names:
        raise ValueError(f"export_peft: the model has no adapter named {adapter_name!r}; adapters: {names}")
    forms = []
    for name in [adapter_name] if adapter_name is not None else names:
        parts = [m for m in methods if m.adapter_name == name]
        if len(parts) > 1:
            raise ValueError(
                f"export_peft: adapter {name!r} combines {[m.name for m in parts]}, but a Hugging Face PEFT adapter "
                "holds one method; use lightning_peft.save_delta for combined methods"
            )
        with full_parameters(obj):  # FSDP1: every unit gathered (a collective)
            config, tensors = peft_form(obj, parts[0])
            tensors = {  # gathers FSDP2 shards: a collective
                k: gathered_copy(v) for k, v in progress(tensors.items(), desc="Exporting", unit="tensor")
            }
        at_root = adapter_name is not None or name == DEFAULT
        forms.append(("" if at_root else name, config, tensors))
    directory = Path(directory)

    def write() -> Path:
        for sub, config, tensors in forms:
            folder = directory / sub if sub else directory
            folder.mkdir(parents=True, exist_ok=True)
            replace_atomically(folder / WEIGHTS, serialize(tensors, {"format": "pt"}))
            replace_atomically(folder / CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
        return directory

    return write_once(write)


def _method_for(config: dict[str, Any], adapter_name: str) -> Method:
    """Our method for a PEFT config, through the registry's ``peft_types`` and ``from_peft_config``."""
    peft_type = config.get("peft_type", "LORA")
    owners = [cls for cls in registry().values() if peft_type in cls.peft_types]
    if not owners:
        known = sorted({t for cls in registry().values() for t in cls.peft_types})
        raise DeltaError(
            f"import_peft: PEFT peft_type {peft_type!r} has no counterpart here; supported: {known}"
        )
    try:
        return owners[0].from_peft_config(config, adapter_name)
    except (KeyError, TypeError, ValueError) as err:
        raise DeltaError(f"import_peft: cannot read this {peft_type} adapter_config.json: {err}") from err


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if not weights_path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise FileNotFoundError(
            f"{folder} has no {WEIGHTS}"
            + (
                "; adapter_model.bin is a pickle and is not loaded (re-save with safe_serialization=True)"
                if pickled
                else ""
            )
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptDeltaError(f"{config_path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CorruptDeltaError(f"{config_path} is not a JSON object")
    return config, deserialize(weights_path.read_bytes(), str(weights_path))


def _load_one(obj: nn.Module, folder: Path, adapter_name: str) -> None:
    config, tensors = _read_folder(folder)
    method = _method_for(config, adapter_name)
    record = {
        "format_version": RECORD_VERSION,
        "adapters": [method.to_dict()],
        "active": [adapter_name],
        "trainable": [adapter_name],
        "backbone_prefix": "",
        "fingerprint": None,  # PEFT records no base fingerprint
        "tensors": {},
    }
    where = f"PEFT adapter {folder}"
    try:
        restore(
            obj,
            record,
            tensors,
            where=where,
            exact=False,
            mapper=lambda model, configs, state: configs[0].from_peft(model, state),
        )
    except MethodError as err:
        raise DeltaError(f"{where}: {err}") from err


def import_peft(obj: nn.Module, source: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load Hugging Face PEFT adapters into ``obj`` so they run (and train) as in PEFT.

    Reads ``adapter_config.json``, builds our method with the registry (the method whose
    ``peft_types`` lists the ``peft_type``), applies it (unless the model already carries
    that adapter with the same config), maps the tensors with the method's ``from_peft``
    and copies them in after checking names and shapes. Pickle files
    (``adapter_model.bin``) are refused.

    Args:
        obj: The base model (or one carrying other adapters).
        source: A PEFT adapter folder or a hub id (fetched into the Hugging Face cache;
            ``HF_HUB_OFFLINE=1`` reads only the cache).
        adapter_name: ``None`` loads the root adapter as ``default`` and every subfolder
            adapter under its folder's name. A name loads the subfolder of that name if
            there is one, else the root adapter under that name.

    Returns:
        ``obj``, with the adapters applied and their weights loaded.

    Raises:
        FileNotFoundError: If ``source`` holds no PEFT adapter.
        DeltaError: If an adapter does not fit ``obj`` or has no counterpart here.
    """
    folder = Path(local_folder(source, what="PEFT adapter", allow_patterns=["*.json", "*.safetensors"]))
    subfolders = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG}"))
    at_root = (folder / CONFIG).is_file()
    if not at_root and not subfolders:
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder ({CONFIG} is missing)")
    if adapter_name is not None:
        if adapter_name in subfolders:
            _load_one(obj, folder / adapter_name, adapter_name)
        elif at_root:
            _load_one(obj, folder, adapter_name)
        else:
            raise FileNotFoundError(f"{folder} holds adapters {subfolders}, not {adapter_name!r}")
        return obj
    if at_root:
        _load_one(obj, folder, DEFAULT)
    for name in subfolders:
        _load_one(obj, folder / name, name)
    return obj
