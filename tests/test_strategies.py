"""Every method under DDP on 2 CPU processes, strategy configuration helpers, and GPU-only strategies.

One subprocess script trains every method in turn under ``strategy="ddp"`` (Lightning's
default ``find_unused_parameters=False``: a trainable parameter left without a gradient
would fail the second step), plus gradient checkpointing and a delta-checkpoint resume,
and saves what each rank ends with. The tests compare both ranks with each other and with a
single-process run on the same global batches.
"""

from __future__ import annotations

import types

import peft_runs
import pytest
import torch
from distributed import run_script
from peft_runs import assert_close, section

DDP_SCRIPT = """
import os
import torch
import peft_runs as p

out = {}
for name in p.METHODS:
    module, callback = p.build(name)
    t = p.trainer(p.STEPS, strategy="ddp", devices=2, callbacks=[callback])
    t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // 2))
    out.update({f"{name}/{k}": v for k, v in p.trained(module).items()})

# two adapters: the callback trains the second, the first stays as it was
module, callback = p.build_two()
p.trainer(p.STEPS, strategy="ddp", devices=2, callbacks=[callback]).fit(module, datamodule=p.loader(p.GLOBAL_BATCH // 2))
out.update({f"two/{k}": v for k, v in p.trained(module).items()})

# gradient checkpointing (non-reentrant) under DDP
module, callback = p.build("lora", gradient_checkpointing=True)
p.trainer(p.STEPS, strategy="ddp", devices=2, callbacks=[callback]).fit(module, datamodule=p.loader(p.GLOBAL_BATCH // 2))
out.update({f"gc/{k}": v for k, v in p.trained(module).items()})

# a delta checkpoint after one epoch (2 steps), resumed for a second epoch on a model with
# other initial adapters (Lightning resumes cleanly from a checkpoint of a finished fit)
module, callback = p.build("lora")
t = p.trainer(-1, strategy="ddp", devices=2, callbacks=[callback], max_epochs=1)
t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // 2))
t.save_checkpoint("ddp.ckpt")
out.update({f"step2/{k}": v for k, v in p.trained(module).items()})
module, callback = p.build("lora", method_seed=7)
t = p.trainer(-1, strategy="ddp", devices=2, callbacks=[callback], max_epochs=2)
t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // 2), ckpt_path="ddp.ckpt")
out.update({f"resume/{k}": v for k, v in p.trained(module).items()})
out["files"] = torch.tensor(len([f for f in os.listdir(".") if f.endswith(".ckpt")]))
torch.save(out, f"rank{t.global_rank}.pt")
"""


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    ranks = run_script(DDP_SCRIPT, tmp)
    assert len(ranks) == 2
    return ranks, tmp


@pytest.mark.slow
def test_ddp_ranks_end_identical(ddp):
    (r0, r1), _ = ddp
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ on {key}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(peft_runs.METHODS))
def test_ddp_matches_single_process_on_the_same_global_batch(ddp, name):
    (r0, _), _ = ddp
    got, want, start = section(r0, name), peft_runs.reference(name), peft_runs.initial(name)
    assert_close(got, want, name)
    assert all(not torch.equal(want[k], start[k]) for k in want), "every trainable tensor should move"


@pytest.mark.slow
def test_ddp_with_two_adapters_trains_the_second_and_leaves_the_first(ddp):
    (r0, r1), _ = ddp
    peft_runs.assert_two_adapters_run(r0, r1)


@pytest.mark.slow
def test_ddp_gradient_checkpointing_changes_nothing(ddp):
    (r0, _), _ = ddp
    assert_close(section(r0, "gc"), peft_runs.reference("lora"), "gradient checkpointing")


@pytest.mark.slow
def test_ddp_delta_checkpoint_written_once_and_resumed_on_every_rank(ddp):
    (r0, r1), tmp = ddp
    assert int(r0["files"]) == 1
    checkpoint = torch.load(tmp / "ddp.ckpt", map_location="cpu", weights_only=False)
    step2 = section(r0, "step2")
    assert checkpoint["state_dict"].keys() == step2.keys(), "only the delta tensors are saved"
    for key, value in step2.items():
        assert torch.equal(checkpoint["state_dict"][key], value)
    # Both ranks resumed weights and optimizer state: a rank with fresh Adam moments would drift.
    assert_close(section(r0, "resume"), section(r0, "lora"), "resumed run")
    assert_close(section(r1, "resume"), section(r0, "lora"), "resumed run on rank 1")


# --------------------------------------------------------------------------- configuration helpers
def test_fsdp1_is_configured_for_mixed_frozen_and_trainable_parameters():
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_peft.strategies import BlockWrapPolicy, configure_fsdp, fsdp_strategy

    module, _ = peft_runs.build("lora")
    strategy = fsdp_strategy()
    configure_fsdp(strategy, module)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert strategy.kwargs["use_orig_params"] is True and isinstance(policy, BlockWrapPolicy)
    wrapped = [n for n, m in module.named_modules() if n and policy(m, recurse=False)]
    assert wrapped == ["backbone.bert.encoder.layer.0", "backbone.bert.encoder.layer.1"]
    assert policy(module, recurse=True)
    with pytest.raises(ValueError, match="use_orig_params"):
        configure_fsdp(FSDPStrategy(use_orig_params=False), module)
    with pytest.raises(ValueError, match="use_orig_params"):
        fsdp_strategy(use_orig_params=False)
    kept = FSDPStrategy(auto_wrap_policy={torch.nn.Linear})
    configure_fsdp(kept, module)
    assert not isinstance(kept.kwargs["auto_wrap_policy"], BlockWrapPolicy), "a user's policy is kept"
    # delta checkpoints are refused up front (with the alternative), not at the first save
    with pytest.raises(NotImplementedError, match="ModelParallelStrategy"):
        strategy.lightning_module_state_dict()
    checkpointing = types.SimpleNamespace(checkpoint_callbacks=[object()])
    with pytest.raises(ValueError, match="enable_checkpointing=False"):
        configure_fsdp(FSDPStrategy(), module, checkpointing)


def test_deepspeed_helper_checks_the_stage_and_adjusts_the_strategy():
    from lightning_peft.checkpointing import META_KEY
    from lightning_peft.strategies import configure_deepspeed, deepspeed_strategy

    with pytest.raises(ValueError, match="stage must be 2 or 3"):
        deepspeed_strategy(stage=1)
    # DeepSpeed itself is not installed here: a stand-in with the attributes the helper sets
    strategy = types.SimpleNamespace(
        exclude_frozen_parameters=False,
        load_checkpoint=lambda path, weights_only=None: {META_KEY: {}, "epoch": 1},
    )
    module, _ = peft_runs.build("lora")
    configure_deepspeed(strategy, module)
    configure_deepspeed(strategy, module)  # idempotent
    assert strategy.exclude_frozen_parameters is True and module.strict_loading is False
    assert strategy.load_checkpoint("x") == {"epoch": 1}, (
        "DeepSpeed loaded the weights; nothing left to verify"
    )


def test_shard_backbone_rejects_tensor_parallel_meshes():
    from lightning_peft.strategies import data_parallel_mesh

    class FakeMesh:
        ndim = 2
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def size(self, i):
            return 2

    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        data_parallel_mesh(FakeMesh())


# --------------------------------------------------------------------------- CUDA only
GPUS = peft_runs.GPUS
needs_a_gpu = pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device")

GPU_SCRIPT = """
import lightning as L
import torch
import peft_runs as p
from lightning_peft.strategies import {helper}

out = {{}}
for name in ("lora", "adapter", "prefix"):
    module, callback = p.build(name)
    t = L.Trainer(
        accelerator="cuda", devices={gpus}, strategy={helper}({args}), max_steps=p.STEPS, callbacks=[callback],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    t.fit(module, datamodule=p.loader(p.GLOBAL_BATCH // {gpus}))
    if {save}:
        t.save_checkpoint(f"{{name}}.ckpt")
    out.update({{f"{{name}}/{{k}}": v for k, v in p.trained_any(t, module).items()}})
torch.save(out, f"rank{{t.global_rank}}.pt")
"""


def assert_gpu_run_matches(ranks, tmp_path):
    assert len(ranks) == GPUS
    r0 = ranks[0]
    for name in ("lora", "adapter", "prefix"):
        got0 = section(r0, name)
        for rank, other in enumerate(ranks[1:], start=1):
            assert_close(got0, section(other, name), f"{name}: rank {rank}", atol=0.0)
        assert_close(got0, peft_runs.reference(name, accelerator="cuda"), f"{name} vs one GPU", atol=1e-4)


@pytest.mark.gpu
@needs_a_gpu
def test_fsdp1_strategy_trains_methods_like_one_gpu_without_checkpoints(tmp_path):
    ranks = run_script(GPU_SCRIPT.format(helper="fsdp_strategy", args="", save=False, gpus=GPUS), tmp_path)
    assert_gpu_run_matches(ranks, tmp_path)


@pytest.mark.gpu
@needs_a_gpu
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_methods_and_saves_without_frozen_weights(tmp_path, stage):
    pytest.importorskip("deepspeed")
    ranks = run_script(
        GPU_SCRIPT.format(helper="deepspeed_strategy", args=f"stage={stage}", save=True, gpus=GPUS), tmp_path
    )
    assert_gpu_run_matches(ranks, tmp_path)
    model_files = list((tmp_path / "lora.ckpt").rglob("*model_states.pt"))
    assert model_files, "DeepSpeed writes a checkpoint folder"
    saved = sum(f.stat().st_size for f in model_files)
    full = sum(p.numel() * 4 for p in peft_runs.classifier().parameters())
    assert saved < 0.5 * full, "frozen weights are excluded"
