"""Trained deltas on disk: trainable state dicts, base-model fingerprints, delta folders, HF PEFT.

A model a method was applied to is a frozen base plus a small trained part. This module
saves and restores only that part, and checks it goes back onto the same base:

* :func:`trainable_state_dict`: the declared-trainable parameters (plus the persistent
  buffers of modules declared trainable as a whole), named relative to the object.
* :func:`~lightning_peft.fingerprint.fingerprint` (in :mod:`lightning_peft.fingerprint`):
  a cheap description of the frozen base, recorded with every delta and checked on load.
* :func:`save_delta` / :func:`load_delta`: a folder holding ``manifest.json`` and one
  ``delta-<generation>.safetensors``. The manifest is replaced atomically and names the
  data file, so a reader always finds one complete generation, even if the writer was
  killed mid-save. Loading validates the folder, the methods and the base fingerprint before
  the model changes, checks names and shapes before any value is copied, and never
  unpickles or imports anything named in the folder.
* :func:`export_peft` / :func:`import_peft`: Hugging Face PEFT's adapter folder format
  (``adapter_config.json`` + ``adapter_model.safetensors``); the per-method mapping lives
  in each method's ``to_peft`` / ``from_peft`` / ``from_peft_config``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fingerprint import (
    IGNORE_FINGERPRINT_ENV,
    CorruptDeltaError,
    DeltaError,
    FingerprintMismatchError,
    _dtype_name,
    check_fingerprint,
    fingerprint,
    fingerprint_mismatches,
    validate_fingerprint,
)
from .methods.base import (
    _ALL,
    REGISTRY,
    Method,
    _declared,
    applied_methods,
    method_from_dict,
    trainable_named_parameters,
)
from .targeting import backbone_prefix
from .version import __version__

FORMAT = "lightning-peft-delta"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PEFT_PREFIX = "base_model.model."
PEFT_PROMPT_LEARNING = frozenset(
    {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}
)
"""PEFT types whose adapter files hold ``prompt_embeddings`` as is, without ``base_model.model.``."""
_DATA_FILE = re.compile(r"delta-[0-9a-f]{8,64}\.safetensors")
_STALE_MANIFEST = re.compile(r"\.manifest-[0-9a-f]{8,64}\.json")
_SHA = re.compile(r"[0-9a-f]{64}")
__all__ = [
    "IGNORE_FINGERPRINT_ENV",
    "CorruptDeltaError",
    "DeltaError",
    "FingerprintMismatchError",
    "export_peft",
    "fingerprint",
    "fingerprint_mismatches",
    "import_peft",
    "load_delta",
    "read_delta",
    "save_delta",
    "trainable_state_dict",
    "trainable_state_names",
]
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


# --------------------------------------------------------------------------- trainable state
# Wrapper modules that insert a level into parameter names but drop it again in
# ``state_dict()``: FSDP1 units and activation-checkpoint wrappers.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _unwrapped(name: str) -> str:
    """``name`` without the levels that FSDP1 / checkpoint wrappers add (as ``state_dict()`` has it)."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def trainable_state_dict(obj: nn.Module, *, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The trained part of ``obj``: what a delta checkpoint holds.

    Declared-trainable parameters (:func:`trainable_named_parameters`, shared tensors once)
    plus the persistent buffers of modules declared trainable as a whole (e.g. a norm
    layer's running statistics under full fine-tuning). Names are relative to ``obj``, as in
    ``obj.state_dict()``: the levels that FSDP1 units and activation-checkpoint wrappers
    insert are left out, so a model trained under ``FSDPStrategy`` exports the same names
    as an unwrapped one.

    Args:
        obj: A model a method was applied to (or any module with declarations).
        keep_vars: Return the parameters themselves instead of detached tensors.
    """
    out: dict[str, torch.Tensor] = {}
    for name, param in trainable_named_parameters(obj):
        out[_unwrapped(name)] = param if keep_vars else param.detach()
    seen = {id(t) for t in out.values()}

    def visit(module: nn.Module, prefix: str, inherited: bool) -> None:
        everything = inherited or _ALL in _declared(module)
        if everything:
            for name, buf in module.named_buffers(recurse=False):
                if buf is None or name in module._non_persistent_buffers_set or id(buf) in seen:
                    continue
                seen.add(id(buf))
                out[_unwrapped(prefix + name)] = buf if keep_vars else buf.detach()
        for child_name, child in module.named_children():
            visit(child, f"{prefix}{child_name}.", everything)

    visit(obj, "", False)
    return out


def trainable_state_names(obj: nn.Module) -> list[str]:
    """Names of :func:`trainable_state_dict`, in its order."""
    return list(trainable_state_dict(obj, keep_vars=True))


# --------------------------------------------------------------------------- shared helpers
def versions() -> dict[str, str | None]:
    """Versions of lightning-peft, torch and transformers (recorded with every delta)."""
    try:
        import transformers

        tf_version: str | None = str(transformers.__version__)
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        tf_version = None
    # Plain ``str`` (torch's version is a subclass) so ``torch.load(weights_only=True)`` reads it.
    return {"lightning_peft": str(__version__), "torch": str(torch.__version__), "transformers": tf_version}


def methods_from_records(records: Any, where: str) -> list[Method]:
    """Rebuild method configs from ``to_dict`` records: registered names only, nothing imported.

    Raises:
        DeltaError: If the records are malformed or name an unknown method or option.
    """
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("method"), str) for r in records
    ):
        raise DeltaError(f"{where}: 'methods' must be a list of {{'method': name, ...}} records")
    try:
        return [method_from_dict(record) for record in records]
    except (TypeError, ValueError) as err:
        raise DeltaError(f"{where}: cannot rebuild the recorded methods: {err}") from err


def check_methods(model: nn.Module, recorded: list[Method], where: str) -> bool:
    """Check ``model``'s applied methods against ``recorded``; return whether they must be applied.

    Raises:
        DeltaError: If ``model`` already carries other methods than the recorded ones.
    """
    live = applied_methods(model)
    if not live:
        return bool(recorded)
    if [m.to_dict() for m in live] != [m.to_dict() for m in recorded]:
        raise DeltaError(
            f"{where} was trained with methods {[m.to_dict() for m in recorded]}, but the model already "
            f"carries {[m.to_dict() for m in live]}; load it into a fresh base model (the recorded "
            "methods are applied for you) or one with exactly these methods"
        )
    return False


def rebase_names(names: list[str], old_prefix: str, new_prefix: str) -> dict[str, str]:
    """Map names saved under one backbone prefix (``"backbone."``) to another (``""``)."""
    if old_prefix == new_prefix or not all(n.startswith(old_prefix) for n in names):
        return {n: n for n in names}
    return {n: new_prefix + n[len(old_prefix) :] for n in names}


def check_tensors(
    incoming: dict[str, torch.Tensor], live: dict[str, torch.Tensor], where: str, *, cast: bool = True
) -> None:
    """Check that ``incoming`` has exactly the keys of ``live``, with the same shapes and kinds of dtype.

    Raises:
        DeltaError: Naming the missing, unexpected or mis-shaped tensors.
    """
    missing = [n for n in live if n not in incoming]
    unexpected = [n for n in incoming if n not in live]
    if missing or unexpected:
        raise DeltaError(
            f"{where} does not hold exactly this model's trainable tensors: missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{'...' if len(unexpected) > 6 else ''} (was it saved with other methods or another model?)"
        )
    for name, value in incoming.items():
        target = live[name]
        if tuple(value.shape) != tuple(target.shape):
            raise DeltaError(
                f"{where}: {name} has shape {tuple(value.shape)}, the model's is {tuple(target.shape)}"
            )
        same_kind = value.dtype.is_floating_point == target.dtype.is_floating_point
        if value.dtype != target.dtype and not (cast and same_kind and target.dtype.is_floating_point):
            raise DeltaError(f"{where}: {name} is {value.dtype}, the model's is {target.dtype}")


@torch.no_grad()
def copy_into(live: dict[str, torch.Tensor], incoming: dict[str, torch.Tensor]) -> None:
    """Copy validated tensors into the model's own (``keep_vars``) tensors, in place."""
    for name, value in incoming.items():
        live[name].copy_(value.to(device=live[name].device, dtype=live[name].dtype))


def _tensor_sha256(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a sibling temporary file, fsync it, and rename it over ``path``."""
    tmp = path.with_name(f".{path.stem}-{secrets.token_hex(8)}{path.suffix}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    # Own, contiguous CPU copies: safetensors refuses shared storage and views.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(plain, metadata=metadata)


def _deserialize(data: bytes, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CorruptDeltaError(f"{where} is not a readable safetensors file: {err}") from err


# --------------------------------------------------------------------------- delta folders
def save_delta(obj: nn.Module, directory: str | os.PathLike) -> Path:
    """Save the trained part of ``obj`` into a delta folder.

    The folder receives ``delta-<generation>.safetensors`` (the tensors of
    :func:`trainable_state_dict`, names relative to ``obj``) and then ``manifest.json`` (the
    methods and their configs, the base fingerprint, library versions, and per-tensor shape,
    dtype and sha256), written to a temporary name, fsynced and renamed over the previous
    manifest. The previous generation's data file is deleted only after that rename, so a
    process killed at any moment leaves either the previous complete delta or the new one.
    One writer per folder at a time.

    Args:
        obj: The model (LightningModule or plain ``nn.Module``) the methods were applied to.
        directory: The folder (created if needed). It may hold only delta files.

    Returns:
        The folder's path.

    Raises:
        ValueError: If ``obj`` has nothing trainable, a LoRA layer is merged, or the folder
            holds files that are not part of a delta.
    """
    directory = Path(directory)
    state = trainable_state_dict(obj)
    if not state:
        raise ValueError(
            f"{type(obj).__name__} has no declared-trainable tensors: apply a method first, e.g. LoRA().apply(model)"
        )
    merged = [n for n, m in obj.named_modules() if getattr(m, "merged", False) is True]
    if merged:
        raise ValueError(
            f"layers {merged[:4]} are merged into the base weights; call lightning_peft.unmerge(model) "
            "before save_delta so the base (and its fingerprint) is the original one"
        )
    directory.mkdir(parents=True, exist_ok=True)
    foreign = [
        p.name
        for p in directory.iterdir()
        if p.name != MANIFEST and not _DATA_FILE.fullmatch(p.name) and not _STALE_MANIFEST.fullmatch(p.name)
    ]
    if foreign:
        raise ValueError(
            f"{directory} holds files that are not part of a delta ({sorted(foreign)[:5]}); "
            "save deltas into an empty or delta-only folder"
        )
    generation = f"{time.time_ns():x}{secrets.token_hex(4)}"
    data_name = f"delta-{generation}.safetensors"
    data = _serialize(state, metadata={"format": "pt", "generation": generation})
    _write_file(directory / data_name, data)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generation": generation,
        "file": data_name,
        "file_bytes": len(data),
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "methods": [m.to_dict() for m in applied_methods(obj)],
        "backbone_prefix": backbone_prefix(obj),
        "versions": versions(),
        "tensors": {
            name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "sha256": _tensor_sha256(t)}
            for name, t in state.items()
        },
        "fingerprint": fingerprint(obj),
    }
    _replace_atomically(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    for path in directory.iterdir():  # the previous generation and leftovers of killed saves
        if path.name != data_name and (
            _DATA_FILE.fullmatch(path.name) or _STALE_MANIFEST.fullmatch(path.name)
        ):
            path.unlink(missing_ok=True)
    return directory


def _validate_manifest(manifest: Any, where: str) -> None:
    def need(condition: bool, problem: str) -> None:
        if not condition:
            raise CorruptDeltaError(f"{where}: {problem}")

    need(isinstance(manifest, dict), "the manifest is not a JSON object")
    need(manifest.get("format") == FORMAT, f"'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    need(
        manifest.get("format_version") == FORMAT_VERSION,
        f"format_version {manifest.get('format_version')!r} is not supported (this reader: {FORMAT_VERSION})",
    )
    need(isinstance(manifest.get("file"), str) and bool(_DATA_FILE.fullmatch(manifest["file"])),
         f"'file' must name a delta-<hex>.safetensors in the folder, got {manifest.get('file')!r}")  # fmt: skip
    need(isinstance(manifest.get("file_bytes"), int), "'file_bytes' must be an integer")
    need(isinstance(manifest.get("file_sha256"), str) and bool(_SHA.fullmatch(manifest["file_sha256"])),
         "'file_sha256' must be 64 hex digits")  # fmt: skip
    need(isinstance(manifest.get("backbone_prefix"), str), "'backbone_prefix' must be a string")
    tensors = manifest.get("tensors")
    need(isinstance(tensors, dict) and bool(tensors), "'tensors' must be a non-empty object")
    for name, spec in tensors.items():
        need(
            isinstance(spec, dict)
            and isinstance(spec.get("shape"), list)
            and all(isinstance(s, int) and s >= 0 for s in spec["shape"])
            and spec.get("dtype") in _DTYPES
            and isinstance(spec.get("sha256"), str)
            and bool(_SHA.fullmatch(spec["sha256"])),
            f"tensor entry {name!r} must have shape (list of ints), dtype (one of {sorted(_DTYPES)}) and sha256",
        )
    validate_fingerprint(manifest.get("fingerprint"), where)


def read_delta(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and fully validate a delta folder without touching any model.

    Checks the manifest's schema, the data file's size and sha256, that the file holds
    exactly the tensors the manifest lists, and every tensor's shape, dtype and sha256.

    Returns:
        ``(manifest, tensors)``.

    Raises:
        FileNotFoundError: If the folder holds no delta.
        CorruptDeltaError: If anything does not check out.
    """
    directory = Path(directory)
    where = f"delta folder {directory}"
    for attempt in range(5):  # a concurrent save may replace the generation between the two reads
        try:
            raw = (directory / MANIFEST).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory} holds no delta ({MANIFEST} is missing)") from None
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptDeltaError(f"{where}: {MANIFEST} is not valid JSON ({err})") from err
        _validate_manifest(manifest, where)
        try:
            data = (directory / manifest["file"]).read_bytes()
            break
        except FileNotFoundError:
            if attempt == 4:
                raise CorruptDeltaError(
                    f"{where}: {manifest['file']} named by {MANIFEST} is missing"
                ) from None
            time.sleep(0.05)
    if len(data) != manifest["file_bytes"] or hashlib.sha256(data).hexdigest() != manifest["file_sha256"]:
        raise CorruptDeltaError(
            f"{where}: {manifest['file']} is damaged or truncated ({len(data)} bytes, sha256 mismatch with "
            f"{MANIFEST}); nothing was loaded"
        )
    tensors = _deserialize(data, f"{where}/{manifest['file']}")
    specs = manifest["tensors"]
    if set(tensors) != set(specs):
        raise CorruptDeltaError(
            f"{where}: the data file holds {sorted(set(tensors) ^ set(specs))[:6]} not matching {MANIFEST}"
        )
    for name, spec in specs.items():
        t = tensors[name]
        if (
            list(t.shape) != spec["shape"]
            or _dtype_name(t.dtype) != spec["dtype"]
            or _tensor_sha256(t) != spec["sha256"]
        ):
            raise CorruptDeltaError(
                f"{where}: tensor {name} does not match its shape, dtype or sha256 in {MANIFEST}"
            )
    tensors = {name: tensors[name] for name in specs}  # manifest order
    return manifest, tensors


def load_delta(obj: nn.Module, directory: str | os.PathLike, *, strict_fingerprint: bool = True) -> nn.Module:
    """Load a delta folder into ``obj``: a fresh base, or one carrying the same methods.

    Order: read and validate the folder (schema, checksums, tensors) and rebuild the
    recorded method configs (registered names only); check the base fingerprint; apply the
    recorded methods if ``obj`` carries none; check the key set, shapes and dtypes against
    ``obj``'s trainable tensors; only then copy. A damaged folder or another base leaves
    ``obj`` untouched.

    Args:
        obj: The base model (LightningModule or plain ``nn.Module``). Names saved under a
            LightningModule's ``backbone.`` load into the bare Hugging Face model too.
        directory: A folder written by :func:`save_delta`.
        strict_fingerprint: ``False`` turns a base mismatch into a warning (so does the
            environment variable ``LIGHTNING_PEFT_IGNORE_FINGERPRINT=1``).

    Returns:
        ``obj``.

    Raises:
        FileNotFoundError: No delta in ``directory``.
        CorruptDeltaError: The folder is damaged or malformed.
        FingerprintMismatchError: ``obj``'s base differs from the recorded one.
        DeltaError: Methods, names, shapes or dtypes do not fit ``obj``.
    """
    manifest, tensors = read_delta(directory)
    where = f"delta folder {directory}"
    recorded = methods_from_records(manifest["methods"], where)
    must_apply = check_methods(obj, recorded, where)
    check_fingerprint(
        manifest["fingerprint"],
        fingerprint(obj),
        strict=strict_fingerprint,
        subsequence=must_apply,
        what=where,
    )
    names = rebase_names(list(tensors), manifest["backbone_prefix"], backbone_prefix(obj))
    incoming = {names[k]: v for k, v in tensors.items()}
    if must_apply:
        for method in recorded:
            method.apply(obj)
    live = trainable_state_dict(obj, keep_vars=True)
    check_tensors(incoming, live, where)
    copy_into(live, incoming)
    return obj


# --------------------------------------------------------------------------- Hugging Face PEFT
def _only_method(obj: nn.Module, action: str) -> Method:
    methods = applied_methods(obj)
    if not methods:
        raise ValueError(
            f"{action}: no method is applied to {type(obj).__name__}; apply one (e.g. LoRA) first"
        )
    if len(methods) > 1:
        raise ValueError(
            f"{action}: this model combines {[m.name for m in methods]}, but a Hugging Face PEFT adapter holds "
            "one method; use lightning_peft.save_delta for combined methods"
        )
    return methods[0]


def export_peft(obj: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the applied method as a Hugging Face PEFT adapter folder.

    ``adapter_config.json`` and ``adapter_model.safetensors`` (tensor names prefixed with
    ``base_model.model.``, except PEFT's prompt-learning types, whose single
    ``prompt_embeddings`` tensor has no prefix), as ``PeftModel.save_pretrained`` writes them, so
    ``PeftModel.from_pretrained(base, directory)`` (and vLLM, TGI, ...) load it.

    Raises:
        ValueError: If no method or several are applied, if the method has no PEFT
            counterpart (adapters, partial and full fine-tuning), or if the PEFT form would
            drop trained tensors.
    """
    method = _only_method(obj, "export_peft")
    try:
        exported = method.to_peft(obj)
    except NotImplementedError:
        exported = None
    if exported is None:
        raise ValueError(
            f"export_peft: {method.name!r} has no Hugging Face PEFT counterpart; use "
            "lightning_peft.save_delta (or export_merged) for it"
        )
    config, state = exported
    trained = sum(t.numel() for t in trainable_state_dict(obj).values())
    exported_count = sum(t.numel() for t in state.values())
    if exported_count < trained:
        raise ValueError(
            f"export_peft: the PEFT form of {method.name!r} holds {exported_count} values but {trained} are "
            "trained; exporting would lose some of them (e.g. a trainable module PEFT does not save)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prompt_learning = config.get("peft_type") in PEFT_PROMPT_LEARNING
    tensors = {(name if prompt_learning else PEFT_PREFIX + name): t for name, t in state.items()}
    _replace_atomically(directory / "adapter_model.safetensors", _serialize(tensors, {"format": "pt"}))
    _replace_atomically(
        directory / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True).encode()
    )
    return directory


def _method_for_peft_config(config: dict[str, Any]) -> Method:
    """Build our method from a PEFT config through the registry's ``from_peft_config``."""
    built: list[Method] = []
    reasons: list[str] = []
    for name, cls in sorted(REGISTRY.items()):
        if getattr(cls.from_peft_config, "__func__", None) is Method.from_peft_config.__func__:
            continue  # the method has no PEFT counterpart
        try:
            built.append(cls.from_peft_config(config))
        except (ValueError, KeyError, TypeError, NotImplementedError) as err:
            reasons.append(f"{name}: {err}")
    if len(built) != 1:
        problem = (
            "no registered method accepts it" if not built else f"{[m.name for m in built]} all accept it"
        )
        raise ValueError(
            f"import_peft: cannot map PEFT peft_type={config.get('peft_type')!r}: {problem}"
            + (f" ({'; '.join(reasons)})" if reasons and not built else "")
        )
    return built[0]


def import_peft(obj: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a Hugging Face PEFT adapter folder into ``obj`` so it runs (and trains) as in PEFT.

    Reads ``adapter_config.json``, builds our method with the registry's
    ``from_peft_config``, applies it to ``obj`` (unless already applied with the same
    config), maps the tensors of ``adapter_model.safetensors`` with the method's
    ``from_peft`` and copies them in after checking names and shapes. Pickle files
    (``adapter_model.bin``) are refused.

    Returns:
        ``obj``, with the method applied and the adapter's weights loaded.
    """
    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a PEFT adapter folder (adapter_config.json is missing)")
    if not weights_path.is_file():
        pickled = (directory / "adapter_model.bin").is_file()
        raise FileNotFoundError(
            f"{directory} has no adapter_model.safetensors"
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
    method = _method_for_peft_config(config)
    state = _deserialize(weights_path.read_bytes(), str(weights_path))
    where = f"PEFT adapter {directory}"
    if check_methods(obj, [method], where):
        method.apply(obj)
    incoming = method.from_peft(obj, state)
    live = trainable_state_dict(obj, keep_vars=True)
    unexpected = [n for n in incoming if n not in live]
    if unexpected:
        raise DeltaError(f"{where}: tensors {unexpected[:6]} are not trainable in this model")
    check_tensors(incoming, {n: live[n] for n in incoming}, where)
    untouched = [n for n in live if n not in incoming]
    if untouched:
        warnings.warn(
            f"{where} holds no values for trainable tensors {untouched[:6]}"
            f"{'...' if len(untouched) > 6 else ''}; they keep their current values",
            stacklevel=2,
        )
    copy_into(live, incoming)
    return obj
