"""``lightning-peft export``: a checkpoint as trained deltas, a Hugging Face PEFT adapter or a merged model.

``lightning-peft export --ckpt run.ckpt --format delta|peft|merged --out DIR`` rebuilds the
LightningModule with ``load_from_checkpoint`` and writes it with
:func:`~lightning_peft.save_delta`, :func:`~lightning_peft.export_peft` or
:func:`~lightning_peft.export_merged`.

- A merged export is a complete Hugging Face folder: the weights, the tokenizer the run used
  and the label names (``id2label``) the module recorded.
- A QLoRA checkpoint (one written under ``FourBitPrecision``, whose settings Lightning keeps in
  the checkpoint) merges onto the 4-bit base it was trained on: the rebuilt base is quantized
  with the recorded settings, then dequantized as the deltas are folded in.
- An export that cannot be made ends in one line on stderr naming the formats that do work
  for the checkpoint, and exit code 2. Which work is asked of the methods themselves
  (their ``to_peft`` and ``folded_layers`` hooks), so a new method needs no entry here.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_peft.merging import active_adapters
from lightning_peft.methods.base import applied_methods
from lightning_peft.persistence import export_merged, export_peft, save_delta
from lightning_peft.persistence.peft import peft_form
from lightning_peft.plugins import FourBitPrecision

__all__ = ["FORMATS", "export_main", "working_formats"]

FORMATS = ("delta", "peft", "merged")
"""The export formats, in the order they are offered."""
_PROG = "lightning-peft export"


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Write a checkpoint's trained deltas, a Hugging Face PEFT adapter or a merged model.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint written by a lightning-peft run")
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="delta: safetensors + manifest; peft: adapter_config.json + adapter_model.safetensors; "
        "merged: a save_pretrained folder with the deltas folded in, the tokenizer and the label names",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--model-class",
        default=None,
        help="LightningModule class that wrote the checkpoint (e.g. lightning_peft.CausalLM); "
        "read from the checkpoint when it was written by this CLI",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="weight dtype of a merged export (default: float32)",
    )
    return parser


def _module_class(name: str) -> type[L.LightningModule]:
    if "." not in name:
        name = f"lightning_peft.{name}"
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import model class {name!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, L.LightningModule)):
        raise ValueError(f"{name!r} is not a LightningModule class")
    return cls


def _fails(check: Any) -> bool:
    try:
        check()
    except ValueError:  # MethodError, DeltaError and the exporters' refusals
        return True
    return False


def working_formats(module: nn.Module) -> list[str]:
    """The export formats ``module`` can be written in, asked of its methods' contract hooks.

    ``delta`` whenever a method is applied; ``peft`` when every adapter is one method with a
    PEFT form for this model (``to_peft``); ``merged`` when every active adapter can be
    folded into plain weights (``folded_layers``).
    """
    methods = applied_methods(module)
    if not methods:
        return []
    formats = ["delta"]
    names = [m.adapter_name for m in methods]
    single = len(set(names)) == len(names)
    if single and not any(_fails(lambda m=m: peft_form(module, m)) for m in methods):
        formats.append("peft")
    if not any(_fails(lambda m=m: m.folded_layers(module, torch.float32)) for m in active_adapters(module)):
        formats.append("merged")
    return formats


def _reason(err: Exception) -> str:
    """The first line of an error, without the advice on what to use instead (the caller lists what works)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for advice in ("; use ", ". Use ", ". Save it with", "; export the adapters with"):
        text = text.split(advice)[0]
    return text.rstrip(". ")


def _quantize_as_trained(module: nn.Module, checkpoint: dict[str, Any]) -> FourBitPrecision | None:
    """Quantize ``module``'s frozen base with the ``FourBitPrecision`` settings the checkpoint recorded.

    Returns the plugin, or ``None`` when the run was not trained over a 4-bit base.
    """
    settings = checkpoint.get(FourBitPrecision.__qualname__)
    if not isinstance(settings, dict) or not settings:
        return None
    accepted = inspect.signature(FourBitPrecision).parameters
    plugin = FourBitPrecision(**{k: v for k, v in settings.items() if k in accepted})
    plugin.convert_module(module)
    return plugin


def export_main(args: Sequence[str]) -> None:
    """Run ``lightning-peft export``: load a checkpoint and write it in the chosen format.

    Args:
        args: The arguments after ``export``.

    Raises:
        SystemExit: With code 2 and one line on stderr when the export cannot be made.
    """
    parser = _export_parser()
    opts = parser.parse_args(list(args))
    ckpt = Path(opts.ckpt).expanduser()
    if not ckpt.is_file():
        parser.error(f"--ckpt: no checkpoint file at {ckpt.resolve()}")
    out = Path(opts.out).expanduser()
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {out.resolve()} exists and is not a folder")

    try:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # not a checkpoint at all: pickle, zip and format errors alike
        parser.error(f"--ckpt: {ckpt} is not a readable checkpoint ({type(err).__name__}: {err})")
    class_name = opts.model_class or (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if class_name is None:
        parser.error(
            f"cannot tell which LightningModule wrote {ckpt}; pass --model-class, e.g. "
            "lightning_peft.CausalLM or lightning_peft.SequenceClassifier"
        )
    try:
        cls = _module_class(class_name)
    except ValueError as err:
        parser.error(str(err))
    try:
        module = cls.load_from_checkpoint(str(ckpt), map_location="cpu")
    except (ValueError, OSError) as err:
        parser.exit(2, f"{_PROG}: error: cannot load {ckpt}: {_reason(err)}\n")
    methods = ", ".join(dict.fromkeys(m.name for m in applied_methods(module))) or "no method"
    quantized = None
    try:
        if opts.format == "delta":
            save_delta(module, str(out))
        elif opts.format == "peft":
            export_peft(module, str(out))
        else:
            quantized = _quantize_as_trained(module, checkpoint)
            kwargs = {"dtype": getattr(torch, opts.dtype)} if opts.dtype else {}
            export_merged(module, str(out), **kwargs)
    except (ValueError, OSError) as err:
        works = [f for f in working_formats(module) if f != opts.format]
        offer = f"formats that work for it: {', '.join(works)}" if works else "no export format works for it"
        parser.exit(
            2,
            f"{_PROG}: error: cannot write {ckpt.name} ({methods}) as {opts.format}: {_reason(err)}; {offer}\n",
        )
    print(f"wrote {opts.format} export of {ckpt} ({methods}) to {out.resolve()}")
    if opts.format == "merged":
        labels = module.hparams.get("label_names")
        notes = [
            f"tokenizer: {'saved' if getattr(module, 'tokenizer', None) is not None else 'none recorded, none saved'}"
        ]
        if labels:
            notes.append(f"labels: {', '.join(labels)}")
        if quantized is not None:
            notes.append(
                f"deltas folded onto the dequantized {quantized.spec.quant_type} base the run trained on"
            )
        print("  " + "; ".join(notes))
