"""Trained deltas on disk and back: state dicts, fingerprints, records, delta folders, PEFT and merged exports.

Everything that reads deltas back goes through :func:`~lightning_peft.persistence.restore.restore`.
"""

from .delta import load_delta, read_delta, save_delta
from .errors import CorruptDeltaError, DeltaError, FingerprintMismatchError
from .fingerprint import IGNORE_FINGERPRINT_ENV, fingerprint, fingerprint_mismatches
from .merged import export_merged
from .peft import export_peft, import_peft
from .records import build_record, validate_record
from .restore import restore
from .state import delta_state_dict, delta_state_names, gathered_delta_state_dict

__all__ = [
    "IGNORE_FINGERPRINT_ENV",
    "CorruptDeltaError",
    "DeltaError",
    "FingerprintMismatchError",
    "build_record",
    "delta_state_dict",
    "delta_state_names",
    "export_merged",
    "export_peft",
    "fingerprint",
    "fingerprint_mismatches",
    "gathered_delta_state_dict",
    "import_peft",
    "load_delta",
    "read_delta",
    "restore",
    "save_delta",
    "validate_record",
]
