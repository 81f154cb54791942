"""A cheap fingerprint of a frozen base model, to check that trained deltas go back onto it.

For every frozen parameter, in module order: its name, logical shape and dtype, a sha256 of
a strided sample of at most 64 of its values, and the same sample rounded to bf16. Only
the sampled elements are read (advanced indexing on the tensor's own strides), ``meta``
tensors contribute their shape only, and a 4-bit weight is described by its dequantized
values in ``(out, in)`` orientation, like a linear layer's dense weight. So a 70B model is
fingerprinted in seconds without materializing anything, the result is the same in every
process, and another base of the same shape gives other hashes.

Comparison (:func:`fingerprint_mismatches`) is by position, so names may carry another
prefix. A tensor stored at the same precision on both sides must match exactly; across
precisions (a 4-bit base and its full-precision original, bf16 and fp32) the bf16 samples
must be within :data:`APPROX_TOLERANCE` relative distance: NF4 rounding moves them by
about 0.1, an unrelated tensor by about 1.4.
"""

from __future__ import annotations

import base64
import hashlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..core.layers import dense_weight, is_conv1d
from ..core.ownership import owned_tensors
from ..core.sharded import sample_positions, unwrapped_name
from ..progress import progress
from .errors import CorruptDeltaError, FingerprintMismatchError

IGNORE_FINGERPRINT_ENV = "LIGHTNING_PEFT_IGNORE_FINGERPRINT"
"""Set to ``1`` to turn a fingerprint mismatch into a warning everywhere (checkpoints too)."""
SAMPLES = 64
"""Values sampled per frozen tensor."""
APPROX_TOLERANCE = 0.3
"""Largest relative L2 distance between the samples of a tensor stored at different
precisions that still counts as the same tensor."""
FINGERPRINT_ALGORITHM = "strided-sample-sha256/v1"


# --------------------------------------------------------------------------- fingerprint
def _frozen_parameters(obj: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """``(qualified name, owner module, attribute, tensor)`` of each base parameter (owned by nothing), once each."""
    trainable = {id(o.tensor) for o in owned_tensors(obj)}
    seen: set[int] = set()
    for module_name, module in obj.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) not in trainable:
                name = f"{module_name}.{attr}" if module_name else attr
                yield unwrapped_name(name), module, attr, param  # as state_dict() names it


def dtype_name(dtype: torch.dtype | Any) -> str:
    """``"float32"`` for ``torch.float32``: the dtype spelling recorded with deltas."""
    return str(dtype).removeprefix("torch.")


def _logical(module: nn.Module, attr: str, param: torch.Tensor) -> tuple[tuple[int, ...], str, Any, bool]:
    """``(shape, dtype, source, quantized)`` of a frozen tensor in its canonical form.

    Linear-layer weights are described in ``(out, in)`` orientation (transformers' ``Conv1D``
    stores ``(in, out)``) and 4-bit weights by their dequantized values, so a base and its
    4-bit version line up. ``source`` is a tensor to index, or a zero-argument callable that
    returns one (4-bit weights are dequantized one layer at a time, only when sampled).
    """
    state = getattr(param, "quant_state", None) or (
        getattr(module, "quant_state", None) if attr == "weight" and hasattr(param, "device_mesh") else None
    )
    if state is not None and attr == "weight":  # 4-bit codes (FSDP2 shards keep the state on the layer)
        shape = tuple(int(s) for s in state.shape)
        return shape, dtype_name(state.dtype), lambda: dense_weight(module), True
    tensor = param.detach()
    if attr == "weight" and tensor.ndim == 2 and is_conv1d(module):
        tensor = tensor.T  # stored (in, out); described as (out, in), a view
    return tuple(tensor.shape), dtype_name(tensor.dtype), tensor, False


def _sample(tensor: torch.Tensor, k: int = SAMPLES) -> torch.Tensor:
    """At most ``k`` values of ``tensor`` at evenly strided flat positions, as fp32 on the CPU.

    Only the sampled elements are read (advanced indexing on the original strides): no copy
    of the whole tensor is made.
    """
    n = tensor.numel()
    if n == 0:
        return torch.empty(0)
    k = min(k, n)
    flat = [0] if k == 1 else [i * (n - 1) // (k - 1) for i in range(k)]  # exact integer positions
    if hasattr(tensor, "device_mesh"):  # an FSDP2-sharded DTensor: each rank reads its own positions
        return sample_positions(tensor, flat)
    index = torch.tensor(flat, dtype=torch.long, device=tensor.device)
    if tensor.ndim == 0:
        values = tensor.reshape(1)
    else:
        values = tensor[torch.unravel_index(index, tuple(tensor.shape))]  # (k,)
    return values.detach().to(device="cpu", dtype=torch.float32)


def fingerprint(obj: nn.Module, samples: int = SAMPLES) -> dict[str, Any]:
    """Describe the frozen base of ``obj`` cheaply, for checking that deltas go back onto it.

    For every frozen parameter (in module order): its name, logical shape and dtype, a
    sha256 of a strided sample of at most ``samples`` values (as fp32), and the same sample
    rounded to bf16 (for the approximate comparison across precisions). ``digest`` hashes
    the shapes and sample hashes of all tensors, name-free. Tensors on the ``meta`` device
    contribute their shape only.

    Cost: ``samples`` elements per tensor; a 4-bit weight is dequantized one layer at a
    time. Nothing else is materialized, so a 70B model is fingerprinted in seconds.

    Returns:
        A JSON-safe dict (``algorithm``, ``samples``, ``count``, ``digest``, ``tensors``).
    """
    tensors: list[dict[str, Any]] = []
    overall = hashlib.sha256(f"{FINGERPRINT_ALGORITHM};{samples}".encode())
    frozen = list(_frozen_parameters(obj))
    for name, module, attr, param in progress(frozen, desc="Fingerprinting the base", unit="tensor"):
        shape, dtype, source, quantized = _logical(module, attr, param)
        entry: dict[str, Any] = {"name": name, "shape": list(shape), "dtype": dtype}
        if quantized:
            entry["quantized"] = True
        if param.device.type == "meta":
            entry["sha"] = None
        else:
            values = _sample(source() if callable(source) else source, samples)  # (k,)
            digest = hashlib.sha256(repr(shape).encode())
            digest.update(values.numpy().tobytes())
            entry["sha"] = digest.hexdigest()[:32]
            approx = values.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
            entry["sample"] = base64.b64encode(approx).decode("ascii")
        overall.update(f"{shape};{entry['sha']}|".encode())
        tensors.append(entry)
    return {
        "algorithm": FINGERPRINT_ALGORITHM,
        "samples": samples,
        "count": len(tensors),
        "digest": overall.hexdigest(),
        "tensors": tensors,
    }


def _decode_sample(entry: dict[str, Any]) -> torch.Tensor | None:
    text = entry.get("sample")
    if not isinstance(text, str):
        return None
    raw = bytearray(base64.b64decode(text.encode("ascii"), validate=True))
    return torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16).float() if raw else torch.empty(0)


def _same_tensor(saved: dict[str, Any], live: dict[str, Any]) -> str | None:
    """``None`` if two fingerprint entries describe the same tensor, else the reason they differ."""
    if saved["shape"] != live["shape"]:
        return f"shape {tuple(saved['shape'])} vs {tuple(live['shape'])}"
    if saved.get("sha") is None or live.get("sha") is None or saved["sha"] == live["sha"]:
        return None  # meta tensors compare by shape only
    cross_precision = (
        bool(saved.get("quantized")) != bool(live.get("quantized")) or saved["dtype"] != live["dtype"]
    )
    if cross_precision:
        a, b = _decode_sample(saved), _decode_sample(live)
        if a is not None and b is not None and a.shape == b.shape:
            scale = float(torch.linalg.vector_norm(a))
            distance = float(torch.linalg.vector_norm(a - b))
            if distance <= APPROX_TOLERANCE * scale or (scale == 0.0 and distance == 0.0):
                return None
    return "values differ"


def fingerprint_mismatches(
    saved: dict[str, Any], live: dict[str, Any], *, subsequence: bool = False
) -> list[str]:
    """Compare a recorded fingerprint with the live one; return one line per difference.

    Tensors are matched by position (names may carry another prefix, e.g. a LightningModule's
    ``backbone.``). A tensor sampled at the same precision on both sides must match exactly;
    across precisions (a 4-bit base vs its original, bf16 vs fp32) the bf16-rounded samples
    must lie within :data:`APPROX_TOLERANCE` relative L2 distance.

    Args:
        saved: The fingerprint recorded with the deltas.
        live: :func:`fingerprint` of the model now.
        subsequence: ``live`` was taken before the recorded methods were applied: it may
            hold more frozen tensors (parameters a method will make trainable); the recorded
            ones must appear in it in order.
    """
    if saved.get("digest") == live.get("digest") and saved.get("count") == live.get("count"):
        return []
    if saved.get("algorithm") != live.get("algorithm") or saved.get("samples") != live.get("samples"):
        return [f"fingerprint algorithm {saved.get('algorithm')!r} is not {live.get('algorithm')!r}"]
    old, new = saved["tensors"], live["tensors"]
    problems: list[str] = []
    if subsequence:
        j = 0
        for entry in old:
            match = next((i for i in range(j, len(new)) if _same_tensor(entry, new[i]) is None), None)
            if match is None:  # no later tensor matches: report it against the one in its place
                reason = _same_tensor(entry, new[j]) if j < len(new) else "no such tensor in this model"
                problems.append(f"{entry['name']}: {reason}")
                j += 1
            else:
                j = match + 1
        return problems
    for entry, other in zip(old, new):
        reason = _same_tensor(entry, other)
        if reason is not None:
            label = entry["name"] if entry["name"] == other["name"] else f"{entry['name']} / {other['name']}"
            problems.append(f"{label}: {reason}")
    if len(old) != len(new):
        problems.append(f"{len(old)} frozen tensors recorded, {len(new)} in this model")
    return problems


def ignore_fingerprint_from_env() -> bool:
    """Whether ``LIGHTNING_PEFT_IGNORE_FINGERPRINT`` asks to skip the fingerprint check."""
    return os.environ.get(IGNORE_FINGERPRINT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_fingerprint(
    saved: dict[str, Any],
    live: dict[str, Any],
    *,
    strict: bool = True,
    subsequence: bool = False,
    what: str = "these deltas",
) -> None:
    """Raise :class:`FingerprintMismatchError` (or warn) if the base differs from the recorded one.

    Args:
        saved: Recorded fingerprint.
        live: Fingerprint of the model now.
        strict: Raise on a mismatch; ``False`` (or the environment variable
            ``LIGHTNING_PEFT_IGNORE_FINGERPRINT=1``) only warns.
        subsequence: See :func:`fingerprint_mismatches`.
        what: What is being loaded, for the message.
    """
    problems = fingerprint_mismatches(saved, live, subsequence=subsequence)
    if not problems:
        return
    shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
    message = (
        f"the base model differs from the one {what} was saved with ({len(problems)} difference(s) "
        f"in the frozen tensors: {shown}). Load the same base weights; to apply them to this base "
        f"deliberately, pass strict_fingerprint=False or set {IGNORE_FINGERPRINT_ENV}=1."
    )
    if strict and not ignore_fingerprint_from_env():
        raise FingerprintMismatchError(message)
    warnings.warn(message, stacklevel=3)


def validate_fingerprint(fp: Any, where: str) -> None:
    """Check the structure of a recorded fingerprint.

    Raises:
        CorruptDeltaError: If it is malformed.
    """
    ok = (
        isinstance(fp, dict)
        and isinstance(fp.get("digest"), str)
        and isinstance(fp.get("count"), int)
        and isinstance(fp.get("tensors"), list)
        and len(fp["tensors"]) == fp["count"]
        and all(
            isinstance(e, dict)
            and isinstance(e.get("name"), str)
            and isinstance(e.get("shape"), list)
            and isinstance(e.get("dtype"), str)
            and (e.get("sha") is None or isinstance(e.get("sha"), str))
            for e in fp["tensors"]
        )
    )
    if not ok:
        raise CorruptDeltaError(f"{where}: the recorded base fingerprint is malformed")
