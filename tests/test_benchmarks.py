"""The benchmark scripts run end to end at tiny sizes and print the rows their docs quote.

These are smoke runs, not measurements: the sizes are far too small for the ratios to mean
anything, so only the structure of the report and its sanity (positive, finite numbers) are
checked.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def markdown_row(text: str, label: str) -> list[str]:
    """The cells of the first markdown table row starting with ``label`` (the label's cell first)."""
    for line in text.splitlines():
        if line.strip().startswith(label):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no row {label!r} in:\n{text}")


def table_row(text: str, label: str) -> list[float]:
    """The numbers on the first line starting with ``label`` (after leading spaces)."""
    for line in text.splitlines():
        if line.strip().startswith(label):
            rest = line.strip()[len(label) :]
            return [float(x) for x in re.findall(r"(?<![\w.-])\d+\.\d+(?![\w.-])", rest)]
    raise AssertionError(f"no row {label!r} in:\n{text}")


@pytest.mark.slow
def test_lora_vs_peft_prints_every_ratio():
    text = run_benchmark(
        "lora_vs_peft.py",
        *("--hidden", "64", "--layers", "1", "--seq", "16", "--batch", "1"),
        *("--steps", "1", "--repeats", "2", "--processes", "2", "--r", "4"),
    )
    for label in (
        "training step (s), dropout 0",
        "training step (s), dropout 0.05",
        "un-merged inference (s)",
        "merged inference vs base (s)",
    ):
        ours, ref, ratio = table_row(text, label)[:3]
        assert ours > 0 and ref > 0 and 0 < ratio < math.inf, (label, text)
    for label in ("peak RSS (MiB), dropout 0.05", "of which training (MiB)"):
        ours, ref, ratio = table_row(text, label)[:3]
        assert ours > 0 and ref > 0 and math.isclose(ratio, ours / ref, rel_tol=1e-3), (label, text)


@pytest.mark.slow
def test_checkpoint_size_reports_bytes_per_parameter():
    text = run_benchmark(
        "checkpoint_size.py",
        *("--hidden", "64", "--layers", "1", "--vocab", "256", "--r", "2", "--steps", "1"),
    )
    for dtype in ("float32", "bfloat16"):
        section = text.split(f"[{dtype}]")[1]
        delta = int(re.search(r"delta \.ckpt\s+([\d,]+) B", section).group(1).replace(",", ""))
        full = int(re.search(r"full Lightning \.ckpt\s+([\d,]+) B", section).group(1).replace(",", ""))
        assert 0 < delta < full, section
        ratio = float(re.search(r"full / delta = ([\d.]+)x", section).group(1))
        assert math.isclose(ratio, full / delta, rel_tol=0.02), section
    assert "fingerprint:" in text


def test_scaling_memory_prints_every_model_size_and_the_headline():
    text = run_benchmark("scaling_memory.py")
    for size in ("7B", "13B", "70B"):
        assert size in text
    for label in ("| 65B, AdamW 32-bit |", "| 65B, AdamW 8-bit |", "| 70B, AdamW 32-bit |"):
        numbers = table_row(text, label)
        parts, total = numbers[-7:-1], numbers[-1]
        assert all(x > 0 for x in parts) and math.isclose(sum(parts), total, abs_tol=0.06), (label, text)
    for budget in ("48", "24"):
        assert re.search(rf"largest Llama that fits in {budget} GB: \d+B", text), text


@pytest.mark.slow
def test_scaling_memory_measures_fits_and_plots(tmp_path):
    plot = tmp_path / "scaling.png"
    text = run_benchmark(
        "scaling_memory.py",
        *("--measure", "--sizes", "64x1,96x1,128x1", "--vocab", "256", "--measure-seq", "16"),
        *("--measure-batch", "1", "--r", "2", "--tmp", str(tmp_path), "--plot", str(plot)),
    )
    fit = re.search(r"fit: peak = (\d+) MiB \+ (-?[\d.]+) bytes x parameters", text)
    assert fit, text
    assert re.search(r"fit against the arithmetic: peak = \d+ MiB \+ [\d.]+ x floor arithmetic", text), text
    for size in ("64x1", "96x1", "128x1"):
        row = markdown_row(
            text, f"| {size} (measured) |"
        )  # params, bf16 share, measured, 2 fits, floor, ratio
        measured, fit_params, fit_floor, floor = (float(x) for x in row[3:7])
        assert measured > 0 and fit_params > 0 and fit_floor > 0 and floor >= 0, text
    assert markdown_row(text, "| 65B (extrapolated) |")[3] == "-"
    assert plot.stat().st_size > 10_000
    assert not any(p.name.startswith("scaling-") for p in tmp_path.iterdir()), "the saved models are deleted"


@pytest.mark.slow
def test_qlora_benchmark_reports_memory_breakdown_optimizers_and_step_ratios():
    text = run_benchmark(
        "qlora.py",
        *("--hidden", "64", "--layers", "1", "--vocab", "256", "--seq", "16", "--batch", "1"),
        *("--r", "2", "--steps", "1", "--rounds", "2"),
    )
    bits = float(re.search(r"bits per quantized weight \(NF4 \+ double quant\): ([\d.]+)", text).group(1))
    assert 4.0 < bits < 4.5, text  # a 64x64 layer pads its second-level scale block past 4.127
    peaks = {}
    for label in (
        "| ours, documented: CausalLM(path) + FourBitPrecision + LoRA |",
        "| ours, documented, gradient checkpointing |",
        "| transformers + PEFT QLoRA |",
        "| PEFT LoRA, bf16 base |",
        "| ours, documented, glibc heap as is (return_freed_memory=False) |",
        "| transformers + PEFT QLoRA, with our heap setting |",
    ):
        peak, vs_peft4, vs_bf16 = table_row(text, label)[:3]
        peaks[label] = peak
        assert peak > 0 and vs_peft4 > 0 and vs_bf16 > 0, (label, text)
    ours, peft4 = (
        peaks["| ours, documented: CausalLM(path) + FourBitPrecision + LoRA |"],
        peaks["| transformers + PEFT QLoRA |"],
    )
    goal = table_row(text, "goal, documented / transformers+PEFT QLoRA:")[0]
    assert math.isclose(goal, ours / peft4, rel_tol=0.01), text
    assert table_row(text, "goal, documented with gradient checkpointing / floor arithmetic:")[0] > 0
    for label in (
        "| 4-bit linear weights (codes + scales) |",
        "| embeddings, head, norms (bf16) |",
        "| LoRA parameters (fp32) |",
        "| gradients (fp32) |",
        "| optimizer state |",
        "| activations (growth over the forward pass) |",
    ):
        row = markdown_row(text, label)  # measured | floor, without and with checkpointing
        assert len(row) == 5 and all(float(x) >= 0 for x in row[1:]), (label, text)
    rest = markdown_row(text, "| allocator, libraries, temporaries (peak - the rows above) |")
    assert len(rest) == 5 and rest[2] == rest[4] == "0", text  # nothing of it in the floor
    peak_row = table_row(text, "| peak |")
    assert math.isclose(peak_row[0], ours, abs_tol=0.11), text
    for label in (
        "| torch.optim.AdamW (fp32 states) |",
        "| bitsandbytes AdamW8bit |",
        "| bitsandbytes PagedAdamW8bit |",
    ):
        state, per_param, peak, vs = table_row(text, label)[:4]
        assert state >= 0 and per_param > 0 and peak > 0 and vs > 0, (label, text)
    for label in ("QLoRA / bf16 LoRA step time:", "ours / transformers+PEFT QLoRA step time:"):
        ratio = table_row(text, label)[0]
        assert 0 < ratio < math.inf, text
    cosine = float(re.search(r"logits cosine ([\d.]+)", text).group(1))
    assert 0.9 < cosine <= 1.0, text


@pytest.mark.slow
def test_multi_adapter_benchmark_checks_outputs_and_prints_every_k():
    text = run_benchmark("multi_adapter.py", *("--hidden", "128", "--layers", "1", "--seq", "1", "8"),
                         *("--repeats", "1", "--ks", "1", "2"))  # fmt: skip
    for seq in (1, 8):
        for k in (1, 2):
            row = table_row(text, f"{seq} | {k:>3} |")
            assert len(row) >= 4 and all(0 < x < math.inf for x in row[:4]), text  # ours, PEFT, ratio, base
        summary = re.search(
            rf"{seq} tokens per row: ours / PEFT at k=2 ([\d.]+) .*ours ([\d.]+)x, PEFT ([\d.]+)x", text
        )
        assert summary and all(0 < float(x) < math.inf for x in summary.groups()), text
