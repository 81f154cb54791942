"""Checkpoint sizes: delta-only Lightning checkpoints and delta folders vs what they replace.

For a LoRA run on a Llama-shaped model (CPU, a few AdamW steps), prints:

* the delta-only ``.ckpt`` in bytes per trainable parameter (weights + AdamW's two moments:
  the limit is 12 in fp32, plus a fixed allowance for metadata and the fingerprint);
* Lightning's default full checkpoint of the same run (every frozen tensor too), and the
  ratio full / delta;
* a ``save_delta`` folder: the safetensors data file against 4 bytes per parameter in
  fp32 (2 in bf16) plus its header, and the manifest's size;
* ``export_peft`` against HF PEFT's ``save_pretrained`` of the same adapter;
* the fingerprint's cost: seconds per frozen tensor, extrapolated to a 70B Llama's tensors.

Usage::

    python benchmarks/checkpoint_size.py                     # hidden 512, 4 layers, r 8
    python benchmarks/checkpoint_size.py --hidden 1024 --layers 8 --r 16
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _models import llama_config

os.environ.setdefault("WANDB_MODE", "offline")
warnings.filterwarnings("ignore")


def build_base(hidden: int, layers: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llama_config(hidden, layers, vocab, kv_group=2, max_positions=512)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def safetensors_header(path: Path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def run(args: argparse.Namespace, dtype: torch.dtype, work: Path) -> dict[str, float]:
    import lightning as L

    from lightning_peft import CausalLM, export_peft, save_delta
    from lightning_peft.callbacks import LoRA
    from lightning_peft.checkpointing import META_KEY
    from lightning_peft.persistence import delta_state_dict

    tag = str(dtype).removeprefix("torch.")
    module = CausalLM(build_base(args.hidden, args.layers, args.vocab, dtype), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (2, 64), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LoRA(r=args.r, alpha=2 * args.r)],
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    ckpt = work / f"delta-{tag}.ckpt"
    trainer.save_checkpoint(ckpt)
    trainable = sum(t.numel() for t in delta_state_dict(module).values())
    total = sum(p.numel() for p in module.parameters())

    # Lightning's default checkpoint of the same run: the same dict with every tensor in it.
    full = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = full.pop(META_KEY)
    full["state_dict"] = {k: v.detach() for k, v in module.state_dict().items()}
    torch.save(full, work / f"full-{tag}.ckpt")

    save_delta(module, work / f"delta-{tag}")
    data = next((work / f"delta-{tag}").glob("delta-*.safetensors"))
    export_peft(module, work / f"ours-peft-{tag}")

    import peft

    base = build_base(args.hidden, args.layers, args.vocab, dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(
        base, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets)
    )
    theirs.save_pretrained(str(work / f"peft-{tag}"))

    return {
        "dtype": tag,
        "trainable": trainable,
        "total": total,
        "ckpt": ckpt.stat().st_size,
        "full_ckpt": (work / f"full-{tag}.ckpt").stat().st_size,
        "metadata_json": len(json.dumps(meta)),
        "delta_data": data.stat().st_size,
        "delta_header": safetensors_header(data),
        "manifest": (work / f"delta-{tag}" / "manifest.json").stat().st_size,
        "ours_peft": folder_bytes(work / f"ours-peft-{tag}"),
        "peft": folder_bytes(work / f"peft-{tag}"),
        "ours_peft_weights": (work / f"ours-peft-{tag}" / "adapter_model.safetensors").stat().st_size,
        "peft_weights": (work / f"peft-{tag}" / "adapter_model.safetensors").stat().st_size,
    }


def fingerprint_cost(args: argparse.Namespace) -> tuple[float, int]:
    from lightning_peft.persistence import fingerprint

    model = build_base(args.hidden, args.layers, args.vocab, torch.float32)
    fingerprint(model)  # warm up
    start = time.perf_counter()
    fp = fingerprint(model)
    return (time.perf_counter() - start) / fp["count"], fp["count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(args, dtype, Path(tmp)) for dtype in (torch.float32, torch.bfloat16)]
    print(f"Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, LoRA r={args.r} all-linear")
    for row in rows:
        width = 4 if row["dtype"] == "float32" else 2
        n = row["trainable"]
        print(f"\n[{row['dtype']}] trainable {n:,} of {row['total']:,} parameters ({n / row['total']:.2%})")
        print(
            f"  delta .ckpt           {row['ckpt']:>12,} B  = {row['ckpt'] / n:.2f} B/param "
            f"(limit 12 + 256 KiB: {(row['ckpt'] - 256 * 1024) / n:.2f} B/param after the allowance); "
            f"metadata {row['metadata_json']:,} B"
        )
        print(
            f"  full Lightning .ckpt  {row['full_ckpt']:>12,} B  -> full / delta = {row['full_ckpt'] / row['ckpt']:.1f}x"
        )
        print(
            f"  delta data file       {row['delta_data']:>12,} B  = {width} B x params + header "
            f"{row['delta_header']:,} B (excess {row['delta_data'] - width * n - row['delta_header']} B); "
            f"manifest {row['manifest']:,} B"
        )
        print(
            f"  export_peft folder    {row['ours_peft']:>12,} B  vs PEFT save_pretrained {row['peft']:,} B "
            f"-> ours / PEFT = {row['ours_peft'] / row['peft']:.3f} "
            f"(weights only: {row['ours_peft_weights'] / row['peft_weights']:.3f})"
        )
    per_tensor, count = fingerprint_cost(args)
    print(
        f"\nfingerprint: {per_tensor * 1e3:.2f} ms per frozen tensor ({count} tensors); a 70B Llama "
        f"(80 layers, 723 tensors) -> about {per_tensor * 723:.2f} s of sampling"
    )


if __name__ == "__main__":
    main()
