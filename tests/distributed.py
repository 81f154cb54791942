"""Run a training script in 2 CPU processes (Lightning's DDP or FSDP2 launcher) and collect results.

Lightning's subprocess launcher re-runs the script once per extra rank, so the script is
written to a file and run with ``python script.py``. Each rank saves what it ends with to
``rank{N}.pt`` in the working folder; the test compares them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

TESTS = Path(__file__).parent


def run_script(body: str, tmp_path: Path, timeout: float = 300) -> list[dict]:
    """Write ``body`` to ``tmp_path/script.py``, run it, and return each rank's saved dict."""
    script = tmp_path / "script.py"
    header = f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
    script.write_text(header + textwrap.dedent(body))
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"script failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    ranks = sorted(tmp_path.glob("rank*.pt"))
    return [torch.load(p, weights_only=True) for p in ranks]


TRAIN_PRELUDE = """
import lightning as L
import torch
from conftest import random_batch


def loader(labels, n=8, batch=4, seq=12, vocab=128):
    batches = [random_batch(labels=labels, seed=i, batch=batch, seq=seq, vocab=vocab) for i in range(n)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def trainer(steps, strategy="ddp", devices=2, callbacks=(), **kw):
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, callbacks=list(callbacks),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kw,
    )


def save_rank(trainer, tensors):
    torch.save({k: v.detach().cpu().clone() for k, v in tensors.items()}, f"rank{trainer.global_rank}.pt")
"""
