"""The documented QLoRA path never holds the full-precision weights.

``CausalLM(folder)`` + ``Trainer(plugins=[FourBitPrecision()], callbacks=[LoRA()])`` streams
the checkpoint into 4-bit while the run is set up. Each measurement runs in a fresh
process: a warm-up fit on a tiny model first (so Lightning's, autograd's and the kernels'
one-time allocations are in the baseline), then the measured fit. The model is built for
the test with full-precision (fp32) weights on disk, almost all of them in linear layers,
so that holding them would show at once. The exact ratios against transformers and PEFT
are measured by ``benchmarks/qlora.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_config

MIB = 2**20
TESTS = Path(__file__).parent

SCRIPT = r"""
import json, sys
import torch
import lightning as L
from lightning_peft import CausalLM
from lightning_peft.callbacks import LoRA
from lightning_peft.plugins import FourBitPrecision

torch.set_num_threads(1)
folder, warmup, how = sys.argv[1], sys.argv[2], sys.argv[3]


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


def fit(module, vocab):
    ids = torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[FourBitPrecision()], callbacks=[LoRA(r=8, target_modules="all-linear")],
    )
    trainer.fit(module, torch.utils.data.DataLoader([batch, batch], batch_size=None))
    return module


fit(CausalLM(warmup), 128)  # one-time allocations of every library land in the baseline
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
if how == "module":  # the full-precision model first, quantized by the plugin afterwards
    from transformers import AutoModelForCausalLM

    module = CausalLM(AutoModelForCausalLM.from_pretrained(folder))
else:
    module = CausalLM(folder)
fit(module, 1000)
four_bit = sum(1 for m in module.modules() if type(m).__name__ == "Linear4bit")
print("RESULT " + json.dumps({"peak": status("VmHWM") - base, "four_bit_layers": four_bit}))
"""


def _save(folder: Path, config) -> int:
    """Save a model with seeded random fp32 weights; returns the bytes of its weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _peak(tmp_path: Path, folder: Path, warmup: Path, how: str) -> dict:
    script = tmp_path / "measure.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    root = str(TESTS.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's lightning_peft
    out = subprocess.run(
        [sys.executable, str(script), str(folder), str(warmup), how],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_documented_qlora_path_never_holds_the_full_precision_weights(tmp_path):
    from transformers import LlamaConfig

    folder, warmup = tmp_path / "model", tmp_path / "warmup"
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=64,
    )
    full = _save(folder, config)  # ~100 MiB of fp32 weights, 96% of them in linear layers
    _save(warmup, tiny_llama_config(num_layers=1))
    streamed = _peak(tmp_path, folder, warmup, "path")
    assert streamed["four_bit_layers"] == 8 * 7
    # Holding the weights would cost their size above the baseline. The run holds 4-bit linear
    # layers (~13 MiB), fp32 embeddings and norms (~4 MiB), LoRA with its gradients and AdamW
    # state (~10 MiB), activations and first-step allocations: measured ~60 MiB (the path that
    # loads the full-precision model first: ~160 MiB).
    bound = full
    assert streamed["peak"] < bound, (streamed["peak"] / MIB, full / MIB)
    # The bound has teeth: loading the full-precision model first (then quantizing) exceeds it.
    loaded = _peak(tmp_path, folder, warmup, "module")
    assert loaded["peak"] > bound, (loaded["peak"] / MIB, full / MIB)
