"""Progress bars on the long steps: shown on a terminal or when asked, never in logs or when asked quiet.

Forced on (``LIGHTNING_PEFT_PROGRESS=1``) each long step writes its bar to stderr; with stderr
not a terminal (as under pytest) or asked quiet (``=0``, ``progress_bars(False)``) nothing is
written, transformers' own "Loading weights" / "Writing model shards" bars included.
"""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch

import lightning_peft
from lightning_peft import SequenceClassifier
from lightning_peft import progress as progress_module
from lightning_peft.callbacks import LoRA
from lightning_peft.progress import PROGRESS_ENV, progress_bars, progress_enabled
from lightning_peft.quantization import load_quantized, quantize_model

from conftest import tiny_bert_classifier, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
TRANSFORMERS_BARS = ("Loading weights", "Writing model shards")


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def bert_folder(tmp_path):
    tiny_bert_classifier().save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def long_steps(folder, tmp_path) -> None:
    """Load, save a delta, read it back, merge and export: every instrumented step but the 4-bit ones."""
    module = SequenceClassifier(str(folder), num_labels=2)
    LoRA(r=2, target_modules=["query"]).apply(module)
    lightning_peft.save_delta(module, tmp_path / "delta")
    lightning_peft.load_delta(SequenceClassifier(str(folder), num_labels=2), tmp_path / "delta")
    lightning_peft.export_peft(module, tmp_path / "peft")
    lightning_peft.export_merged(module, tmp_path / "merged")


OURS = ("Fingerprinting the base", "Saving the delta", "Checking the delta", "Exporting", "Merging")


def test_forced_on_every_long_step_writes_its_bar_to_stderr(bert_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    long_steps(bert_folder, tmp_path)
    err = capsys.readouterr().err
    for desc in OURS:
        assert desc in err, f"no {desc!r} bar"
    assert re.search(r"\d+/\d+ \[", err), err[-500:]  # counts: "3/39 [" (the final state may be cleared)


@pytest.mark.parametrize("quiet", ["not a terminal", "env 0", "context"])
def test_nothing_is_written_when_not_a_terminal_or_asked_quiet(
    quiet, bert_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    if quiet == "env 0":
        monkeypatch.setenv(PROGRESS_ENV, "0")
    if quiet != "not a terminal":  # asked quiet even on a terminal
        monkeypatch.setattr(sys, "stderr", Terminal())
    if quiet == "context":
        with progress_bars(False):
            long_steps(bert_folder, tmp_path)
    else:
        long_steps(bert_folder, tmp_path)
    err = capsys.readouterr().err + (sys.stderr.getvalue() if isinstance(sys.stderr, Terminal) else "")
    for desc in OURS + TRANSFORMERS_BARS:
        assert desc not in err, f"{desc!r} written although quiet ({quiet})"


def test_on_a_terminal_bars_appear_for_steps_longer_than_the_delay(bert_folder, tmp_path, monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress_module, "TERMINAL_DELAY", 0.0)
    assert progress_enabled()
    long_steps(bert_folder, tmp_path)
    assert all(desc in terminal.getvalue() for desc in OURS)


def test_the_environment_and_the_context_decide_over_the_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert not progress_enabled()
    for value, want in (("1", True), ("on", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv(PROGRESS_ENV, value)
        assert progress_enabled() is want, value
    monkeypatch.setenv(PROGRESS_ENV, "1")
    with progress_bars(False):
        assert not progress_enabled()
        with progress_bars(None):
            assert progress_enabled()
    monkeypatch.setenv(PROGRESS_ENV, "0")
    with progress_bars(True):
        assert progress_enabled()


def test_quantizing_and_streaming_into_4bit_show_bars_only_when_on(tmp_path, monkeypatch, capsys):
    tiny_llama().save_pretrained(tmp_path / "llama")
    monkeypatch.setenv(PROGRESS_ENV, "1")
    quantize_model(tiny_llama())
    load_quantized(tmp_path / "llama", dtype=torch.float32)
    err = capsys.readouterr().err
    assert "Quantizing to 4-bit" in err and "Loading into 4-bit" in err
    monkeypatch.setenv(PROGRESS_ENV, "0")
    quantize_model(tiny_llama())
    load_quantized(tmp_path / "llama", dtype=torch.float32)
    assert "4-bit" not in capsys.readouterr().err
