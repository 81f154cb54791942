"""Errors of everything that reads trained deltas back (checkpoints, delta folders, PEFT folders)."""

from __future__ import annotations

__all__ = ["CorruptDeltaError", "DeltaError", "FingerprintMismatchError"]


class DeltaError(ValueError):
    """Deltas (a folder, a checkpoint, a PEFT adapter) cannot be applied to this model."""


class CorruptDeltaError(DeltaError):
    """A delta folder or checkpoint is incomplete, damaged or not in the expected format."""


class FingerprintMismatchError(DeltaError):
    """The frozen base model differs from the one the deltas were trained on."""
