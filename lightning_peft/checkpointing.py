"""Delta-only Lightning checkpoints: what the checkpoint hooks do, in plain Python.

With a method applied, a Lightning checkpoint (``ModelCheckpoint``, ``trainer.save_checkpoint``)
keeps in ``checkpoint["state_dict"]`` only the tensors adapters (and the module itself) own
(:func:`~lightning_peft.persistence.state.delta_state_dict`, named as Lightning names them:
relative to the LightningModule) and adds under ``checkpoint["lightning_peft"]`` the delta
record (:mod:`lightning_peft.persistence.records`): every adapter's method config, which
were active and trainable, a fingerprint of the frozen base, the tensors' shapes and
dtypes, and versions.
Optimizer, scheduler, loop and callback states stay as Lightning writes them; the
optimizer holds exactly the trainable parameters, in the same order on every run, so its
state lines up on resume.

On load, *before* Lightning's strict ``load_state_dict``, :func:`on_load_checkpoint` runs
the one restore path (checks, then applies the recorded adapters to a fresh base if it
carries none: ``CausalLM.load_from_checkpoint(path)``) and fills the frozen part of
``checkpoint["state_dict"]`` with the live model's own tensors, so strict loading passes
and changes nothing but the trained tensors.

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

from .core.layers import is_4bit
from .methods.base import MethodError
from .persistence.errors import DeltaError
from .persistence.records import build_record, validate_record
from .persistence.restore import restore
from .persistence.state import delta_state_names

META_KEY = "lightning_peft"
"""Key of the delta record in a Lightning checkpoint dict."""
_RESTORED = "_lightning_peft_restored"  # in-memory marker: this dict was already prepared for loading
_HOOKED = "_lp_checkpoint_hooks"

__all__ = ["META_KEY", "install_hooks", "is_delta_checkpoint", "on_load_checkpoint", "on_save_checkpoint"]


def is_delta_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Whether ``checkpoint`` was written with only the trained tensors."""
    return isinstance(checkpoint.get(META_KEY), dict)


def on_save_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Keep only the trained tensors in ``checkpoint["state_dict"]`` and record how to rebuild.

    Does nothing if the module owns no tensors of its own or of any adapter (a plain run
    keeps Lightning's full checkpoint) or if ``checkpoint`` was already processed.

    Raises:
        RuntimeError: If a trained tensor is missing from Lightning's state dict (a
            strategy that renames parameters).
    """
    if META_KEY in checkpoint or "state_dict" not in checkpoint:
        return
    names = delta_state_names(pl_module)
    if not names:
        return
    full = checkpoint["state_dict"]
    missing = [name for name in names if name not in full]
    if missing:
        raise RuntimeError(
            f"the checkpoint's state_dict lacks trained tensors {missing[:5]}: the strategy names "
            "parameters differently from the LightningModule, so a delta checkpoint cannot be written"
        )
    kept = {name: full[name] for name in names}
    checkpoint["state_dict"] = kept
    checkpoint[META_KEY] = build_record(pl_module, kept)


def on_load_checkpoint(
    pl_module: nn.Module, checkpoint: dict[str, Any], *, strict_fingerprint: bool = True
) -> None:
    """Verify a delta checkpoint, load its tensors, and complete its state dict from the live model.

    Goes through the one restore path (:func:`lightning_peft.persistence.restore.restore`):
    the record, the recorded adapters against those applied (none applied: they are
    rebuilt by registered name and applied after the checks; others applied: refused), the
    base fingerprint, then the exact key set and shapes. Then every key of the live
    ``state_dict`` is filled with the live tensor, so Lightning's strict load changes
    nothing but the trained tensors. Checkpoints without a delta record are left alone.

    Raises:
        FingerprintMismatchError: The live base differs from the recorded one.
        DeltaError: Adapters, key set or shapes do not match.
    """
    if not is_delta_checkpoint(checkpoint) or checkpoint.get(_RESTORED):
        return
    record = checkpoint[META_KEY]
    where = "checkpoint"
    validate_record(record, where)
    saved: dict[str, torch.Tensor] = checkpoint["state_dict"]
    try:
        restore(
            pl_module, record, saved, where=where, strict_fingerprint=strict_fingerprint, only_recorded=True
        )
    except MethodError as err:
        raise DeltaError(f"{where}: {err}") from err
    live = pl_module.state_dict(keep_vars=True)
    # A 4-bit layer writes its quantization state next to its weight ("weight.absmax", ...)
    # but takes back only the weight: leave those out, or a base streamed into 4-bit before
    # the restore (FourBitPrecision with a model path) would fail Lightning's strict load.
    quant = tuple(f"{name}.weight." for name, module in pl_module.named_modules() if is_4bit(module))
    checkpoint["state_dict"] = {
        name: tensor.detach() if isinstance(tensor, torch.Tensor) else tensor
        for name, tensor in live.items()
        if not (quant and name.startswith(quant))
    }
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
