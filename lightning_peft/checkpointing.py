"""Delta-only Lightning checkpoints: what the checkpoint hooks do, in plain Python.

With a method applied, a Lightning checkpoint (``ModelCheckpoint``, ``trainer.save_checkpoint``)
keeps in ``checkpoint["state_dict"]`` only the trained tensors (:func:`trainable_state_dict`,
named as Lightning names them: relative to the LightningModule) and adds under
``checkpoint["lightning_peft"]`` what is needed to rebuild and verify: the method configs,
a fingerprint of the frozen base, the trained tensors' shapes and dtypes, and versions.
Optimizer, scheduler, loop and callback states stay as Lightning writes them; the
optimizer holds exactly the trainable parameters, in the same order on every run, so its
state lines up on resume.

On load, *before* Lightning's strict ``load_state_dict``, :func:`on_load_checkpoint` checks
the recorded methods, the fingerprint and the key set, applies the recorded methods to a
fresh base if it carries none (``CausalLM.load_from_checkpoint(path)``), and fills the
frozen part of ``checkpoint["state_dict"]`` with the live model's own tensors, so strict
loading passes and changes nothing but the trained tensors.

Lightning calls ``LightningModule.on_load_checkpoint`` before loading the state dict but a
callback's ``on_load_checkpoint`` only after it, so a method callback installs the hooks on
the module (:func:`install_hooks`) when the run is set up; our LightningModules call them
from their own hooks. Every function here is idempotent on a given checkpoint dict, so the
several places that call it do the work once.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .delta import check_methods, check_tensors, methods_from_records, trainable_state_dict, versions
from .fingerprint import (
    FINGERPRINT_ALGORITHM,
    DeltaError,
    _dtype_name,
    check_fingerprint,
    fingerprint,
    validate_fingerprint,
)
from .methods.base import applied_methods
from .targeting import backbone_prefix

META_KEY = "lightning_peft"
"""Key of the delta metadata in a Lightning checkpoint dict."""
CHECKPOINT_FORMAT_VERSION = 1
_RESTORED = "_lightning_peft_restored"  # in-memory marker: this dict was already prepared for loading
_HOOKED = "_lp_checkpoint_hooks"


def is_delta_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Whether ``checkpoint`` was written with only the trained tensors."""
    return isinstance(checkpoint.get(META_KEY), dict)


def on_save_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Keep only the trained tensors in ``checkpoint["state_dict"]`` and record how to rebuild.

    Does nothing if the module declares nothing trainable (a plain run keeps Lightning's
    full checkpoint) or if ``checkpoint`` was already processed.

    Raises:
        RuntimeError: If a trainable tensor is missing from Lightning's state dict (a
            strategy that renames parameters).
    """
    if META_KEY in checkpoint or "state_dict" not in checkpoint:
        return
    state = trainable_state_dict(pl_module)
    if not state:
        return
    full = checkpoint["state_dict"]
    missing = [name for name in state if name not in full]
    if missing:
        raise RuntimeError(
            f"the checkpoint's state_dict lacks trainable tensors {missing[:5]}: the strategy names "
            "parameters differently from the LightningModule, so a delta checkpoint cannot be written"
        )
    checkpoint["state_dict"] = {name: full[name] for name in state}
    checkpoint[META_KEY] = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "methods": [m.to_dict() for m in applied_methods(pl_module)],
        "fingerprint": fingerprint(pl_module),
        "backbone_prefix": backbone_prefix(pl_module),
        "tensors": {
            name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in state.items()
        },
        "versions": versions(),
    }


def _validate(meta: Any) -> None:
    where = "checkpoint"
    if not isinstance(meta, dict) or meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise DeltaError(
            f"{where}: delta metadata format_version {version!r} is not supported (this reader: "
            f"{CHECKPOINT_FORMAT_VERSION}); it was written by lightning-peft "
            f"{(meta.get('versions') or {}).get('lightning_peft') if isinstance(meta, dict) else '?'}"
        )
    validate_fingerprint(meta.get("fingerprint"), where)
    if meta["fingerprint"].get("algorithm") != FINGERPRINT_ALGORITHM:
        raise DeltaError(
            f"{where}: fingerprint algorithm {meta['fingerprint'].get('algorithm')!r} is unknown"
        )


def on_load_checkpoint(
    pl_module: nn.Module, checkpoint: dict[str, Any], *, strict_fingerprint: bool = True
) -> None:
    """Verify a delta checkpoint and complete its state dict from the live model.

    Checks, before anything changes: the metadata, the recorded methods against those
    applied (none applied: they are rebuilt by registered name and applied after the
    checks), the base fingerprint, then that ``state_dict`` holds exactly the trainable
    tensors with their shapes. Then fills every other key of the live ``state_dict`` with
    the live tensor (tied aliases of a trained tensor get its saved value). Checkpoints
    without delta metadata are left alone.

    Args:
        pl_module: The LightningModule being restored.
        checkpoint: The loaded checkpoint dict (modified in place).
        strict_fingerprint: ``False`` (or ``LIGHTNING_PEFT_IGNORE_FINGERPRINT=1``) turns a
            base mismatch into a warning.

    Raises:
        FingerprintMismatchError: The live base differs from the recorded one.
        DeltaError: Methods, key set or shapes do not match.
    """
    if not is_delta_checkpoint(checkpoint) or checkpoint.get(_RESTORED):
        return
    meta = checkpoint[META_KEY]
    _validate(meta)
    where = "checkpoint"
    recorded = methods_from_records(meta.get("methods"), where)
    must_apply = check_methods(pl_module, recorded, where)
    check_fingerprint(
        meta["fingerprint"],
        fingerprint(pl_module),
        strict=strict_fingerprint,
        subsequence=must_apply,
        what="this checkpoint",
    )
    saved: dict[str, torch.Tensor] = checkpoint["state_dict"]
    if must_apply:
        for method in recorded:
            method.apply(pl_module)
    trained = trainable_state_dict(pl_module, keep_vars=True)
    check_tensors(saved, trained, where)
    owner = {id(t): name for name, t in trained.items()}
    filled: dict[str, torch.Tensor] = {}
    for name, tensor in pl_module.state_dict(keep_vars=True).items():
        if name in saved:
            filled[name] = saved[name]
        elif isinstance(tensor, torch.Tensor) and id(tensor) in owner:
            filled[name] = saved[owner[id(tensor)]]  # tied alias of a trained tensor
        else:
            filled[name] = tensor.detach() if isinstance(tensor, torch.Tensor) else tensor
    checkpoint["state_dict"] = filled
    checkpoint[_RESTORED] = True


# --------------------------------------------------------------------------- hooks on any module
def _save_hook(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    on_save_checkpoint(module, checkpoint)
    type(module).on_save_checkpoint(module, checkpoint)


def _load_hook(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    on_load_checkpoint(module, checkpoint)
    type(module).on_load_checkpoint(module, checkpoint)


def install_hooks(pl_module: nn.Module) -> None:
    """Make ``pl_module``'s own ``on_save_checkpoint``/``on_load_checkpoint`` do the delta work first.

    Needed for any LightningModule a method callback runs on: Lightning calls callbacks'
    ``on_load_checkpoint`` only after the strict state-dict load, and not at all for
    ``save_weights_only`` checkpoints. The module's class hooks still run afterwards. The
    hooks are picklable (``functools.partial`` of module-level functions).
    """
    if getattr(pl_module, _HOOKED, False):
        return
    object.__setattr__(pl_module, "on_save_checkpoint", functools.partial(_save_hook, pl_module))
    object.__setattr__(pl_module, "on_load_checkpoint", functools.partial(_load_hook, pl_module))
    object.__setattr__(pl_module, _HOOKED, True)
