"""Saving after a distributed run: ``save_delta``, ``export_peft`` and ``export_merged`` on every rank.

A user calls them after ``trainer.fit`` on every rank, as after any accelerate or FSDP run.
One subprocess script trains LoRA and (IA)³ under DDP and under FSDP2
(``ModelParallelStrategy``, every parameter a ``DTensor`` shard) on 2 CPU processes and
then calls all three on every rank into shared folders. Lightning runs ``FSDPStrategy``
(FSDP1) on CUDA only, so a second script wraps the module in FSDP1 units itself (torch runs
FSDP1 on CPU with gloo), as Lightning's strategy does, and saves through both the
LightningModule and the wrapped model. The tests load what was written in one process and
compare it with the trained tensors and with what a single process writes from them.
"""

from __future__ import annotations

import json

import peft_runs
import pytest
import torch
from distributed import run_script
from peft_runs import assert_close, section

pytestmark = pytest.mark.slow

SCRIPT = """
import os
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

import lightning_peft
import peft_runs as p

RUNS = {  # kind: (strategy, method)
    "ddp": (lambda: "ddp", "lora"),
    "fsdp2": (lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "lora"),
    "fsdp2_ia3": (lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "ia3"),
}
out = {}
for kind, (strategy, method) in RUNS.items():
    module, callback = p.build(method)
    t = p.trainer(p.STEPS, strategy=strategy(), devices=2, callbacks=[callback])
    t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // 2))
    out.update({f"{kind}/{k}": v for k, v in p.trained(module).items()})
    out[f"{kind}_sharded"] = torch.tensor(any(hasattr(q, "device_mesh") for q in module.parameters()))
    # every rank calls each of them, twice into the same folder (a second generation)
    for _ in range(2):
        lightning_peft.save_delta(module, f"{kind}-delta")
    lightning_peft.export_peft(module, f"{kind}-peft")
    lightning_peft.export_merged(module, f"{kind}-merged")
    out[f"{kind}_delta_files"] = torch.tensor(len(os.listdir(f"{kind}-delta")))

# a mean-pooling classifier under FSDP2: its forward runs inside the sharded backbone's own call
module, callback = p.build("lora", pooling="mean")
t = p.trainer(p.STEPS, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2, callbacks=[callback])
t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // 2))
out.update({f"fsdp2_mean/{k}": v for k, v in p.trained(module).items()})
lightning_peft.save_delta(module, "fsdp2_mean-delta")
try:
    lightning_peft.export_merged(module, "fsdp2_mean-merged")
    out["fsdp2_mean_merged_refused"] = torch.tensor(False)
except ValueError:
    out["fsdp2_mean_merged_refused"] = torch.tensor(True)
torch.save(out, f"rank{t.global_rank}.pt")
"""


FSDP1_SCRIPT = """
import os
import socket
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FullyShardedDataParallel

import lightning_peft
import peft_runs as p
from lightning_peft.methods.base import trainable_named_parameters
from lightning_peft.strategies import BlockWrapPolicy


def main(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = {}
    for kind, method in (("fsdp1", "lora"), ("fsdp1_ia3", "ia3")):
        module, _ = p.build(method)
        torch.manual_seed(3)  # trained-looking deltas, the same on both ranks
        with torch.no_grad():
            for _, param in trainable_named_parameters(module):
                param.add_(0.1 * torch.randn_like(param))
        out.update({f"{kind}/{k}": v for k, v in p.trained(module).items()})
        full = {n: q.numel() for n, q in module.named_parameters()}
        # what Lightning's FSDPStrategy does: one unit per block, the root around the LightningModule
        root = FullyShardedDataParallel(
            module, auto_wrap_policy=BlockWrapPolicy(module), use_orig_params=True, device_id=torch.device("cpu")
        )
        held = sum(q.numel() for q in module.parameters())
        out[f"{kind}_sharded"] = torch.tensor(held < 0.75 * sum(full.values()))
        module._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(model=root))  # as Lightning leaves it
        lightning_peft.save_delta(module, f"{kind}-delta")
        lightning_peft.export_peft(root, f"{kind}-peft")  # a plain PyTorch user passes the wrapped model
        lightning_peft.export_merged(module, f"{kind}-merged")
        out[f"{kind}_delta_files"] = torch.tensor(len(os.listdir(f"{kind}-delta")))
    torch.save(out, f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(main, args=(port,), nprocs=2)
"""


def run(script: str, tmp_path_factory, name: str):
    tmp = tmp_path_factory.mktemp(name)
    ranks = run_script(script, tmp)
    assert len(ranks) == 2
    return ranks, tmp


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    return run(SCRIPT, tmp_path_factory, "saving")


@pytest.fixture(scope="module")
def fsdp1_runs(tmp_path_factory):
    return run(FSDP1_SCRIPT, tmp_path_factory, "saving_fsdp1")


# run kind: (the fixture that makes it, method)
RUNS = {
    "ddp": ("lightning_runs", "lora"),
    "fsdp2": ("lightning_runs", "lora"),
    "fsdp2_ia3": ("lightning_runs", "ia3"),
    "fsdp1": ("fsdp1_runs", "lora"),
    "fsdp1_ia3": ("fsdp1_runs", "ia3"),
}
KINDS = {kind: method for kind, (_, method) in RUNS.items()}


@pytest.fixture
def saved(request, kind):
    return request.getfixturevalue(RUNS[kind][0])


def one_process_copy(kind: str, trained: dict[str, torch.Tensor]):
    """A fresh single-process module of run ``kind``'s method holding the trained tensors."""
    module, _ = peft_runs.build(KINDS[kind])
    state = module.state_dict()
    state.update(trained)
    module.load_state_dict(state)
    return module


@pytest.mark.parametrize("kind", ["ddp", "fsdp1"])
def test_the_runs_were_distributed_and_ranks_agree(saved, kind):
    (r0, r1), _ = saved
    sharded = (
        ["fsdp1_sharded", "fsdp1_ia3_sharded"] if kind == "fsdp1" else ["fsdp2_sharded", "fsdp2_ia3_sharded"]
    )
    assert all(bool(r0[key]) for key in sharded)
    assert kind == "fsdp1" or not bool(r0["ddp_sharded"])
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ on {key}"


@pytest.mark.parametrize("kind", KINDS)
def test_save_delta_on_every_rank_writes_one_folder_that_loads_in_one_process(saved, kind, tmp_path):
    from lightning_peft import load_delta, save_delta
    from lightning_peft.persistence import read_delta

    (r0, _), tmp = saved
    trained = section(r0, kind)
    assert int(r0[f"{kind}_delta_files"]) == 2, "one manifest and one data file: no rank deleted another's"
    module, _ = peft_runs.build(KINDS[kind], method_seed=7)
    load_delta(module, tmp / f"{kind}-delta")
    got = peft_runs.trained(module)
    assert got.keys() == trained.keys()
    assert all(torch.equal(got[k], trained[k]) for k in trained)
    # the same tensors and record as one process writes
    manifest, tensors = read_delta(tmp / f"{kind}-delta")
    want_manifest, want = read_delta(save_delta(one_process_copy(kind, trained), tmp_path / "one"))
    assert tensors.keys() == want.keys() and all(torch.equal(tensors[k], want[k]) for k in want)
    assert manifest["fingerprint"] == want_manifest["fingerprint"]
    assert manifest["adapters"] == want_manifest["adapters"]


@pytest.mark.parametrize("kind", KINDS)
def test_export_peft_on_every_rank_equals_one_process_export(saved, kind, tmp_path):
    from safetensors.torch import load_file

    from lightning_peft import SequenceClassifier, export_peft, import_peft

    (r0, _), tmp = saved
    trained = section(r0, kind)
    folder = tmp / f"{kind}-peft"
    want_folder = export_peft(one_process_copy(kind, trained), tmp_path / "one")
    got, want = (
        load_file(folder / "adapter_model.safetensors"),
        load_file(want_folder / "adapter_model.safetensors"),
    )
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    got_config = json.loads((folder / "adapter_config.json").read_text())
    assert got_config == json.loads((want_folder / "adapter_config.json").read_text())
    module = SequenceClassifier(peft_runs.classifier(), num_labels=2)  # a fresh base
    import_peft(module, folder)
    loaded = peft_runs.trained(module)
    # PEFT's modules_to_save come back as the adapter's own copy of the head (PEFT's semantics)
    copied = {k.replace(".classifier.", ".classifier.copies.default.module."): v for k, v in trained.items()}
    assert all(torch.equal(loaded[k], v) for k, v in copied.items())


@pytest.mark.parametrize("kind", KINDS)
def test_export_merged_on_every_rank_loads_in_bare_transformers_with_the_same_logits(saved, kind):
    from transformers import AutoModelForSequenceClassification

    (r0, _), tmp = saved
    reference = one_process_copy(kind, section(r0, kind)).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp / f"{kind}-merged").eval()
    batch = peft_runs.samples(4)
    inputs = {k: torch.stack([b[k] for b in batch]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = reference(**inputs).logits
        got = merged(**inputs).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_mean_pooling_classifier_trains_and_saves_under_fsdp2_like_one_process(lightning_runs):
    from lightning_peft import SequenceClassifier, load_delta

    (r0, r1), tmp = lightning_runs
    trained = section(r0, "fsdp2_mean")
    assert_close(trained, peft_runs.reference("lora", pooling="mean"), "mean pooling under FSDP2")
    assert_close(section(r1, "fsdp2_mean"), trained, "rank 1", atol=0.0)
    assert bool(r0["fsdp2_mean_merged_refused"]) and bool(r1["fsdp2_mean_merged_refused"])
    module = load_delta(
        SequenceClassifier(peft_runs.classifier(), num_labels=2, pooling="mean"), tmp / "fsdp2_mean-delta"
    )
    got = peft_runs.trained(module)
    assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in trained)


# --------------------------------------------------------------------------- CUDA only
CUDA_SCRIPT = """
import torch
import lightning_peft
import peft_runs as p
from lightning_peft.strategies import fsdp_strategy

module, callback = p.build("lora")
t = p.trainer(p.STEPS, strategy=fsdp_strategy(), devices=GPUS, callbacks=[callback], accelerator="cuda")
t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // GPUS))
out = {f"lightning_fsdp1/{k}": v for k, v in p.trained_any(t, module).items()}
lightning_peft.save_delta(module, "lightning_fsdp1-delta")
lightning_peft.export_peft(module, "lightning_fsdp1-peft")
lightning_peft.export_merged(module, "lightning_fsdp1-merged")
torch.save(out, f"rank{t.global_rank}.pt")
"""


@pytest.mark.gpu
@pytest.mark.skipif(peft_runs.GPUS == 0, reason="needs a CUDA device")
def test_saving_after_a_lightning_fsdp_strategy_run_on_cuda(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lightning_peft import SequenceClassifier, import_peft, load_delta

    ranks = run_script(CUDA_SCRIPT.replace("GPUS", str(peft_runs.GPUS)), tmp_path)
    trained = section(ranks[0], "lightning_fsdp1")
    for folder, load in (("delta", load_delta), ("peft", import_peft)):
        module = SequenceClassifier(peft_runs.classifier(), num_labels=2)
        load(module, tmp_path / f"lightning_fsdp1-{folder}")
        got = peft_runs.trained(module)
        assert got.keys() == trained.keys() and all(torch.allclose(got[k], trained[k]) for k in trained), (
            folder
        )
    reference = one_process_copy("fsdp1", trained).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lightning_fsdp1-merged").eval()
    ids = torch.stack([b["input_ids"] for b in peft_runs.samples(4)])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
