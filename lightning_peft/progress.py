"""Progress bars for the long steps: streaming 4-bit loads, quantizing, fingerprinting, merging, saving.

A bar (tqdm, on stderr) is shown when stderr is a terminal and the step takes longer than
:data:`TERMINAL_DELAY` seconds, and never otherwise (logs, CI, notebooks capturing output).
Choose explicitly with the environment variable ``LIGHTNING_PEFT_PROGRESS`` (``1`` always
shows bars at once, ``0`` never) or, for a block of code, with :func:`progress_bars`::

    with lightning_peft.progress.progress_bars(False):
        lightning_peft.export_merged(model, "out/merged")

Only global rank 0 of a distributed run shows bars. While our bars are off, the bars
``transformers`` and ``huggingface_hub`` draw inside our load and export paths ("Loading
weights", "Writing model shards", "Fetching files") are off too (:func:`library_bars`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch.distributed as dist
from huggingface_hub import utils as hub_utils
from tqdm import tqdm
from transformers.utils import logging as transformers_logging

__all__ = [
    "PROGRESS_ENV",
    "TERMINAL_DELAY",
    "library_bars",
    "progress",
    "progress_bar",
    "progress_bars",
    "progress_enabled",
]

PROGRESS_ENV = "LIGHTNING_PEFT_PROGRESS"
"""``1`` (or ``true``/``yes``/``on``) always shows progress bars, ``0`` (``false``/``no``/``off``) never."""
TERMINAL_DELAY = 1.0
"""Seconds a step must take before its bar appears when shown only because stderr is a terminal."""

T = TypeVar("T")
_OVERRIDE: ContextVar[bool | None] = ContextVar("lightning_peft_progress", default=None)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _choice() -> bool | None:
    """``True``/``False`` when asked for (context, then environment), ``None`` to decide by the terminal."""
    override = _OVERRIDE.get()
    if override is not None:
        return override
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def _rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def progress_enabled() -> bool:
    """Whether bars are shown here: asked for (:func:`progress_bars`, ``LIGHTNING_PEFT_PROGRESS``), else stderr is a terminal.

    Always ``False`` on ranks other than 0 of a distributed run.
    """
    if not _rank_zero():
        return False
    choice = _choice()
    if choice is not None:
        return choice
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(callable(isatty) and isatty())


def progress_bar(*, desc: str, total: int | None = None, unit: str = "it", iterable: Any = None) -> Any:
    """A tqdm bar on stderr, disabled unless :func:`progress_enabled`; ``update``/``close`` it as usual."""
    enabled = progress_enabled()
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        file=sys.stderr,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
        delay=0.0 if _choice() else TERMINAL_DELAY,
    )


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate over ``iterable`` with a bar (see :func:`progress_bar`); the bar closes when the loop ends."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress_bar(desc=desc, total=total, unit=unit, iterable=iterable) as bar:
        yield from bar


@contextlib.contextmanager
def progress_bars(enabled: bool | None) -> Iterator[None]:
    """Show (``True``) or hide (``False``) every bar inside the block; ``None`` restores the default rule."""
    token = _OVERRIDE.set(enabled)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


@contextlib.contextmanager
def library_bars() -> Iterator[None]:
    """Inside the block, ``transformers``' and ``huggingface_hub``'s bars follow ours: off unless ours are on.

    When ours are on, theirs are left as the user set them. Restored on exit.
    """
    if progress_enabled():
        yield
        return
    was_on = transformers_logging.is_progress_bar_enabled()
    hub_was_on = not hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also turns huggingface_hub's off
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()
        if hub_was_on:
            hub_utils.enable_progress_bars()
        elif was_on:
            hub_utils.disable_progress_bars()
