"""FSDP2 through Lightning's ``ModelParallelStrategy`` on 2 CPU processes (gloo).

One subprocess script trains every method with our modules' ``configure_model`` sharding
each transformer block, then writes and resumes delta checkpoints (sharded folder and
single file) and trains QLoRA. The tests compare both ranks with each other and with a
single-process run on the same global batches, and load the sharded checkpoint into a
single-process model.
"""

from __future__ import annotations

import math
import types

import peft_runs
import pytest
import torch
from distributed import run_script
from peft_runs import assert_close, section

FSDP2_SCRIPT = """
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule

import peft_runs as p
from lightning_peft.core.layers import is_4bit


def fsdp2(**kw):
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **kw)


def fit(name, strategy, epochs=None, ckpt=None, seed=1, plugins=None):
    module, callback = p.build(name, method_seed=seed)
    steps = -1 if epochs else p.STEPS
    t = p.trainer(steps, strategy=strategy, devices=2, callbacks=[callback], max_epochs=epochs, plugins=plugins)
    t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // 2), ckpt_path=ckpt)
    return t, module


out = {}
for name in p.METHODS:
    t, module = fit(name, fsdp2())
    out.update({f"{name}/{k}": v for k, v in p.trained(module).items()})
    if name == "lora":
        params = list(module.parameters())
        out["lora_local_fraction"] = torch.tensor(sum(q.to_local().numel() for q in params) / sum(q.numel() for q in params))
        out["lora_all_dtensor"] = torch.tensor(all(hasattr(q, "device_mesh") for q in params))
        out["lora_fsdp_modules"] = torch.tensor(sum(isinstance(m, FSDPModule) for m in module.modules()))

# two adapters: the callback trains the second, the first stays as it was
module, callback = p.build_two()
t = p.trainer(p.STEPS, strategy=fsdp2(), devices=2, callbacks=[callback])
t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // 2))
out.update({f"two/{k}": v for k, v in p.trained(module).items()})

# delta checkpoints after one epoch (2 steps), resumed for a second epoch on a model with
# other initial adapters: a sharded folder (the default) and one gathered file
for kind, kw in (("sharded", {}), ("file", {"save_distributed_checkpoint": False})):
    t, module = fit("lora", fsdp2(**kw), epochs=1)
    t.save_checkpoint(f"{kind}.ckpt")
    out.update({f"{kind}_step2/{k}": v for k, v in p.trained(module).items()})
    t, module = fit("lora", fsdp2(**kw), epochs=2, ckpt=f"{kind}.ckpt", seed=7)
    out.update({f"{kind}_resume/{k}": v for k, v in p.trained(module).items()})

# QLoRA: the base is quantized (NF4) before it is sharded
t, module = fit("lora", fsdp2(), plugins=[p.four_bit()])
out.update({f"qlora/{k}": v for k, v in p.trained(module).items()})
t.save_checkpoint("qlora.ckpt")
layers = [m for m in module.modules() if is_4bit(m)]
out["qlora_layers"] = torch.tensor(len(layers))
out["qlora_sharded"] = torch.tensor(all(hasattr(m.weight, "device_mesh") for m in layers))

# QLoRA from a folder (the documented path): each rank streams the checkpoint into 4-bit,
# the method is applied, then each block is sharded. from_pretrained (the full-precision
# model) is never called on either rank.
import transformers


def refuse(*args, **kwargs):
    raise AssertionError("a rank loaded the full-precision model")


transformers.AutoModelForSequenceClassification.from_pretrained = refuse
import os

# The same LoRA initialization on both ranks (applied while the run is set up). A seed left by
# seed_everything in this environment would be re-applied by the strategy's setup: none here.
os.environ.pop("PL_GLOBAL_SEED", None)
torch.manual_seed(1)
module, callback = p.build_from_folder("base", "lora")
t = p.trainer(p.STEPS, strategy=fsdp2(), devices=2, callbacks=[callback], plugins=[p.four_bit()])
t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // 2))
out.update({f"qlora_path/{k}": v for k, v in p.trained(module).items()})
codes = [m.weight for m in module.modules() if is_4bit(m)]
out["qlora_path_layers"] = torch.tensor(len(codes))
out["qlora_path_local_fraction"] = torch.tensor(sum(w.to_local().numel() for w in codes) / sum(w.numel() for w in codes))
names = t.precision_plugin.quantized_modules
out["qlora_path_streamed"] = torch.tensor(bool(names) and all("base_layer" not in n for n in names))
torch.save(out, f"rank{t.global_rank}.pt")
"""


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2")
    peft_runs.classifier().save_pretrained(tmp / "base")  # the folder the documented-path run loads
    ranks = run_script(FSDP2_SCRIPT, tmp)
    assert len(ranks) == 2
    return ranks, tmp


@pytest.mark.slow
def test_fsdp2_ranks_end_identical(fsdp2):
    (r0, r1), _ = fsdp2
    assert r0.keys() == r1.keys()
    for key in r0:
        if not key.startswith("lora_local"):
            assert torch.equal(r0[key], r1[key]), f"ranks differ on {key}"


@pytest.mark.slow
def test_fsdp2_shards_frozen_and_trainable_parameters_per_block(fsdp2):
    (r0, r1), _ = fsdp2
    assert bool(r0["lora_all_dtensor"]), "every parameter, frozen or trainable, is a DTensor shard"
    assert int(r0["lora_fsdp_modules"]) == 3, "two transformer blocks plus the backbone"
    assert float(r0["lora_local_fraction"]) + float(r1["lora_local_fraction"]) == pytest.approx(1.0)
    assert 0.4 < float(r0["lora_local_fraction"]) < 0.6


@pytest.mark.slow
@pytest.mark.parametrize("name", list(peft_runs.METHODS))
def test_fsdp2_matches_single_process_on_the_same_global_batch(fsdp2, name):
    (r0, _), _ = fsdp2
    got, want, start = section(r0, name), peft_runs.reference(name), peft_runs.initial(name)
    assert_close(got, want, name)
    assert all(not torch.equal(want[k], start[k]) for k in want), "every trainable tensor should move"


@pytest.mark.slow
def test_fsdp2_sharded_delta_checkpoint_holds_only_the_deltas_and_resumes(fsdp2):
    import torch.distributed.checkpoint as dcp

    (r0, _), tmp = fsdp2
    folder = tmp / "sharded.ckpt"
    step2 = section(r0, "sharded_step2")
    metadata = dcp.FileSystemReader(folder).read_metadata()
    stored = metadata.state_dict_metadata
    assert {k.split(".", 1)[1] for k in stored if k.startswith("state_dict.")} == set(step2)
    payload = {k: math.prod(v.size) * 4 for k, v in stored.items() if hasattr(v, "size")}
    delta_bytes = sum(v.numel() * v.element_size() for v in step2.values())
    assert sum(b for k, b in payload.items() if k.startswith("state_dict.")) == delta_bytes
    # the optimizer state: two AdamW moments per delta tensor (plus scalar steps)
    assert (
        2 * delta_bytes
        <= sum(b for k, b in payload.items() if k.startswith("optimizer_0."))
        < 2 * delta_bytes + 4096
    )
    shards = [f for f in folder.iterdir() if f.suffix == ".distcp"]
    assert len(shards) == 2, "each rank writes its own shard"
    # on disk: the payload plus a serialization header of under 2 KiB per stored piece
    assert sum(f.stat().st_size for f in shards) < sum(payload.values()) + 2048 * len(metadata.storage_data)
    model_bytes = sum(q.numel() * 4 for q in peft_runs.classifier().parameters())
    assert delta_bytes < 0.25 * model_bytes
    assert_close(section(r0, "sharded_resume"), section(r0, "lora"), "resumed under FSDP2")


@pytest.mark.slow
def test_fsdp2_single_file_delta_checkpoint_resumes(fsdp2):
    (r0, _), tmp = fsdp2
    checkpoint = torch.load(tmp / "file.ckpt", map_location="cpu", weights_only=False)
    step2 = section(r0, "file_step2")
    assert checkpoint["state_dict"].keys() == step2.keys()
    for key, value in step2.items():
        assert torch.equal(checkpoint["state_dict"][key], value)
    assert_close(section(r0, "file_resume"), section(r0, "lora"), "resumed from one file")


@pytest.mark.slow
def test_fsdp2_checkpoint_loads_and_resumes_in_one_process(fsdp2, tmp_path):
    from lightning_peft import SequenceClassifier
    from lightning_peft.strategies import consolidate_checkpoint

    (r0, _), tmp = fsdp2
    out = tmp_path / "one.ckpt"
    checkpoint = consolidate_checkpoint(tmp / "sharded.ckpt", out)
    assert checkpoint["state_dict"].keys() == section(r0, "sharded_step2").keys()
    loaded = SequenceClassifier.load_from_checkpoint(out, model=peft_runs.classifier())
    assert_close(peft_runs.trained(loaded), section(r0, "sharded_step2"), "loaded in one process", atol=0.0)
    # and training continues in one process with the optimizer state written by two
    module, callback = peft_runs.build("lora", method_seed=7)
    trainer = peft_runs.trainer(-1, callbacks=[callback], max_epochs=2)
    trainer.fit(module, datamodule=peft_runs.loader(peft_runs.GLOBAL_BATCH), ckpt_path=out)
    assert_close(peft_runs.trained(module), peft_runs.reference("lora"), "resumed in one process")


@pytest.mark.slow
def test_qlora_trains_under_fsdp2_like_one_process(fsdp2):
    (r0, _), _ = fsdp2
    assert int(r0["qlora_layers"]) > 0 and bool(r0["qlora_sharded"]), "4-bit codes are sharded"
    want = peft_runs.reference("lora", qlora=True)
    assert_close(section(r0, "qlora"), want, "QLoRA")
    start = peft_runs.initial("lora")
    assert all(not torch.equal(want[k], start[k]) for k in want)


@pytest.mark.slow
def test_qlora_from_a_folder_streams_on_each_rank_keeps_its_shard_and_trains_like_one_process(
    fsdp2, monkeypatch
):
    (r0, r1), tmp = fsdp2
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # as in the script (a recipe test may leave one)
    assert bool(r0["qlora_path_streamed"]) and bool(r1["qlora_path_streamed"]), "quantized while loading"
    assert int(r0["qlora_path_layers"]) == int(r0["qlora_layers"]) > 0
    halves = float(r0["qlora_path_local_fraction"]), float(r1["qlora_path_local_fraction"])
    assert sum(halves) == pytest.approx(1.0) and all(0.4 < h < 0.6 for h in halves), halves
    torch.manual_seed(1)
    module, callback = peft_runs.build_from_folder(tmp / "base", "lora")
    trainer = peft_runs.trainer(callbacks=[callback], plugins=[peft_runs.four_bit()])
    trainer.fit(module, datamodule=peft_runs.loader(peft_runs.GLOBAL_BATCH))
    want = peft_runs.trained(module)
    assert_close(section(r0, "qlora_path"), want, "QLoRA from a folder")
    # the same 4-bit base as quantizing the loaded model: the single-process QLoRA reference
    assert_close(want, peft_runs.reference("lora", qlora=True), "streamed vs preloaded QLoRA", atol=1e-4)


@pytest.mark.slow
def test_qlora_fsdp2_checkpoint_fingerprints_the_4bit_base_and_loads_in_one_process(fsdp2, tmp_path):
    from lightning_peft import SequenceClassifier
    from lightning_peft.strategies import consolidate_checkpoint

    (r0, _), tmp = fsdp2
    checkpoint = consolidate_checkpoint(tmp / "qlora.ckpt", tmp_path / "qlora.ckpt")
    entries = checkpoint["lightning_peft"]["fingerprint"]["tensors"]
    four_bit = [e for e in entries if e.get("quantized")]
    assert len(four_bit) == int(r0["qlora_layers"])
    assert all(len(e["shape"]) == 2 and e["sha"] for e in four_bit), "described dequantized, as (out, in)"
    # the 4-bit base matches its full-precision original within quantization error
    loaded = SequenceClassifier.load_from_checkpoint(tmp_path / "qlora.ckpt", model=peft_runs.classifier())
    assert_close(peft_runs.trained(loaded), section(r0, "qlora"), "QLoRA deltas in one process", atol=0.0)


# --------------------------------------------------------------------------- no processes needed
def test_quantizing_after_sharding_is_refused_with_the_fix():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_peft.plugins import check_strategy

    sharded = types.SimpleNamespace(weight=types.SimpleNamespace(device_mesh=object()))
    plain = types.SimpleNamespace(weight=torch.zeros(1))
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    check_strategy(strategy, [("a", plain)], sharding_next=True)  # quantize, then shard: right
    check_strategy(strategy, [])  # quantized and sharded already: nothing left to do
    with pytest.raises(RuntimeError, match="does not support ModelParallelStrategy.*shard_backbone"):
        check_strategy(strategy, [("a", plain)])  # would quantize a model nobody shards next
    with pytest.raises(RuntimeError, match="sharded before it was quantized.*shard_backbone"):
        check_strategy(strategy, [("a", plain), ("b", sharded)], sharding_next=True)


@pytest.mark.slow
def test_fsdp2_with_two_adapters_trains_the_second_and_leaves_the_first(fsdp2):
    (r0, r1), _ = fsdp2
    peft_runs.assert_two_adapters_run(r0, r1)


def test_sample_positions_reads_plain_tensors_at_flat_positions():
    from lightning_peft.core.sharded import sample_positions

    t = torch.arange(12.0).reshape(3, 4)
    assert sample_positions(t, [0, 5, 11]).tolist() == [0.0, 5.0, 11.0]
    assert sample_positions(t.T, [1]).tolist() == [4.0]


def test_the_restore_path_checks_keys_and_shapes_before_copying():
    from lightning_peft.persistence import DeltaError, build_record, gathered_delta_state_dict, restore

    module, _ = peft_runs.build("lora")
    state = {k: torch.ones_like(v) for k, v in gathered_delta_state_dict(module).items()}
    record = build_record(module, state)
    restore(module, record, state, where="test")
    assert all(torch.equal(v, state[k]) for k, v in gathered_delta_state_dict(module).items())
    first = next(iter(state))
    with pytest.raises(DeltaError, match="missing"):
        restore(module, record, {k: v for k, v in state.items() if k != first}, where="test")
    with pytest.raises(DeltaError, match="shape"):
        restore(module, record, {**state, first: torch.ones(1)}, where="test")


# --------------------------------------------------------------------------- CUDA only
GPUS = peft_runs.GPUS

CUDA_SCRIPT = """
import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

import peft_runs as p

RUNS = {
    "lora": (None, 2, None, 1),
    "qlora": ([p.four_bit()], 2, None, 1),
    "qlora_half": ([p.four_bit()], 1, None, 1),
    "qlora_resume": ([p.four_bit()], 2, "half.ckpt", 7),
}
out = {}
for kind in KINDS:
    plugins, epochs, ckpt, seed = RUNS[kind]
    module, callback = p.build("lora", method_seed=seed)
    t = L.Trainer(
        accelerator="cuda", devices=GPUS, strategy=ModelParallelStrategy(data_parallel_size=GPUS, tensor_parallel_size=1),
        max_epochs=epochs, callbacks=[callback], plugins=plugins, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // GPUS), ckpt_path=ckpt)
    if kind == "qlora_half":
        t.save_checkpoint("half.ckpt")
    out.update({f"{kind}/{k}": v for k, v in p.trained(module).items()})
torch.save(out, f"rank{t.global_rank}.pt")
"""


def run_cuda(kinds: list[str], tmp_path) -> dict:
    script = CUDA_SCRIPT.replace("KINDS", repr(kinds)).replace("GPUS", str(GPUS))
    ranks = run_script(script, tmp_path)
    assert len(ranks) == GPUS
    for other in ranks[1:]:
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], other[key]), f"ranks differ on {key}"
    return ranks[0]


@pytest.mark.gpu
@pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device")
def test_fsdp2_on_cuda_matches_one_gpu(tmp_path):
    r0 = run_cuda(["lora"], tmp_path)
    assert_close(
        section(r0, "lora"), peft_runs.reference("lora", accelerator="cuda"), "FSDP2 on CUDA", atol=1e-4
    )


@pytest.mark.gpu
@pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device")
def test_fsdp2_qlora_on_cuda_matches_one_gpu_and_resumes(tmp_path):
    try:
        r0 = run_cuda(["qlora", "qlora_half", "qlora_resume"], tmp_path)
    except AssertionError as err:
        if "cannot shard the 4-bit base with FSDP2" in str(err):
            pytest.skip(
                f"this torch's FSDP2 cannot shard 4-bit codes (torch {torch.__version__}); the run said so"
            )
        raise
    want = peft_runs.reference("lora", qlora=True, accelerator="cuda")
    assert_close(section(r0, "qlora"), want, "QLoRA on CUDA", atol=1e-3)
    assert_close(section(r0, "qlora_resume"), section(r0, "qlora"), "QLoRA resumed on CUDA")
