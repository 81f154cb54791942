"""Runs the strategy tests compare: every method on one tiny classifier, seeded the same everywhere.

A single-process run on batches of ``B`` and a 2-process run on ``B/2`` per rank (Lightning's
``DistributedSampler`` without shuffling splits each global batch between the ranks) see
the same global batches. With dropout at 0 and a mean-reduced sequence-classification loss,
their gradients, and so their trained weights, agree up to float rounding.

The method is applied before ``fit`` under a fixed seed, so every rank and the reference
start from the same initial adapters (the callback's own ``apply`` then is a no-op); the
callback still takes part in the run (strategy checks, delta checkpoints).
"""

from __future__ import annotations

import functools

import lightning as L
import torch

GLOBAL_BATCH = 4
# CUDA tests use two GPUs when there are, else one (a world of one still runs a strategy's
# wrapping, sharded optimizer and checkpoint code paths); 0 skips them.
GPUS = min(torch.cuda.device_count(), 2) if torch.cuda.is_available() else 0
SAMPLES = 8  # two steps per epoch
STEPS = 4


def _methods() -> dict:
    """Every registered method's example configuration (a new method joins by registering), plus DoRA."""
    from lightning_peft.methods.base import registry

    methods = {name: (cls.callback_name, dict(cls.example)) for name, cls in sorted(registry().items())}
    methods["dora"] = ("LoRA", {"r": 4, "alpha": 8, "target_modules": ["query", "value"], "use_dora": True})
    return methods


METHODS = _methods()


def classifier(seed: int = 0):
    """A 2-layer BERT sequence classifier without dropout (so runs are deterministic)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    return BertForSequenceClassification(cfg)


def samples(n: int = SAMPLES, seq: int = 10, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` equal-length, unpadded examples (no padding: every token counts the same)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


class Batches(L.LightningDataModule):
    """Sequential batches of ``batch`` examples per rank.

    Lightning's automatic ``DistributedSampler`` always shuffles training data, so the
    sampler is made here, without shuffling: rank ``r`` of ``n`` takes examples ``r, r+n, ...``,
    and the ranks' batches at one step together form the single-process batch.
    """

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = samples()
        split = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None)
        sampler = None
        if split:  # any distributed strategy, a world of one included
            sampler = torch.utils.data.DistributedSampler(data, shuffle=False, **split)
        return torch.utils.data.DataLoader(data, batch_size=self.batch, sampler=sampler)


def loader(batch: int) -> Batches:
    """The data for ``Trainer.fit(module, datamodule=loader(batch))``."""
    return Batches(batch)


def build(name: str, method_seed: int = 1, **module_kw):
    """``(module, callback)``: a fresh classifier with method ``name`` applied under ``method_seed``."""
    from lightning_peft import SequenceClassifier
    from lightning_peft import callbacks as c

    module = SequenceClassifier(classifier(), num_labels=2, lr=1e-2, schedule="constant", **module_kw)
    callback_name, options = METHODS[name]
    callback = getattr(c, callback_name)(**options)
    torch.manual_seed(method_seed)
    callback.apply(module)
    return module, callback


def build_from_folder(folder, name: str, **module_kw):
    """``(module, callback)``: a classifier that loads ``folder`` itself, method ``name`` not yet applied.

    The callback applies the method when the run is set up (seed the run first).
    """
    from lightning_peft import SequenceClassifier
    from lightning_peft import callbacks as c

    module = SequenceClassifier(str(folder), num_labels=2, lr=1e-2, schedule="constant", **module_kw)
    callback_name, options = METHODS[name]
    return module, getattr(c, callback_name)(**options)


def build_two(method_seed: int = 1):
    """``(module, callback)``: a classifier carrying a trained-looking LoRA ``first``, and a callback adding ``second``."""
    from lightning_peft import SequenceClassifier
    from lightning_peft.callbacks import LoRA

    module = SequenceClassifier(classifier(), num_labels=2, lr=1e-2, schedule="constant")
    torch.manual_seed(method_seed)
    LoRA(r=2, alpha=4, target_modules=["query", "value"], adapter_name="first").apply(module)
    with torch.no_grad():  # B != 0, as if trained: a wrongly active first adapter would show
        for name, param in module.named_parameters():
            if ".lora.first.lora_b" in name:
                param.normal_(std=0.1)
    callback = LoRA(r=2, alpha=4, target_modules="all-linear", adapter_name="second")
    torch.manual_seed(method_seed + 1)
    callback.apply(module)
    return module, callback


@functools.cache
def reference_two(steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The single-process run of :func:`build_two` (cached: do not modify)."""
    module, callback = build_two()
    trainer(steps, callbacks=[callback]).fit(module, datamodule=loader(GLOBAL_BATCH))
    return trained(module)


def trainer(
    steps: int = STEPS, strategy="auto", devices: int = 1, callbacks=(), accelerator: str = "cpu", **kw
) -> L.Trainer:
    """A quiet trainer, CPU by default (checkpointing only if a ``ModelCheckpoint`` is among ``callbacks``)."""
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def trained(module) -> dict[str, torch.Tensor]:
    """The delta tensors of ``module``, gathered in full (a collective under FSDP2), on the CPU."""
    from lightning_peft.persistence import gathered_delta_state_dict

    return {k: v.detach().cpu().clone() for k, v in gathered_delta_state_dict(module).items()}


def four_bit():
    """The QLoRA precision plugin, computing in fp32 so runs compare tightly."""
    from lightning_peft.plugins import FourBitPrecision

    return FourBitPrecision("nf4", compute_dtype=torch.float32)


@functools.cache
def reference(
    name: str, steps: int = STEPS, qlora: bool = False, accelerator: str = "cpu", **module_kw
) -> dict[str, torch.Tensor]:
    """The single-device run of method ``name`` on global batches (cached: do not modify).

    CUDA runs compare with ``accelerator="cuda"``, so both sides use the same kernels.
    """
    module, callback = build(name, **module_kw)
    plugins = [four_bit()] if qlora else None
    t = trainer(steps, callbacks=[callback], plugins=plugins, accelerator=accelerator)
    t.fit(module, datamodule=loader(GLOBAL_BATCH))
    return trained(module)


def initial(name: str) -> dict[str, torch.Tensor]:
    """The delta tensors before training."""
    module, _ = build(name)
    return trained(module)


def trained_any(trainer, module) -> dict[str, torch.Tensor]:
    """:func:`trained` under FSDP1 or DeepSpeed ZeRO-3 too (gathers their shards first; CUDA tests)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from lightning_peft.methods.base import trainable_named_parameters

    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            return trained(module)
    if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
        import deepspeed

        params = [p for _, p in trainable_named_parameters(module)]
        with deepspeed.zero.GatheredParameters(params):
            return trained(module)
    return trained(module)


def section(result: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The entries ``prefix/<name>`` of a saved result, keyed by ``<name>``."""
    return {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith(prefix + "/")}


def assert_two_adapters_run(rank0: dict, rank1: dict) -> None:
    """Both ranks of a distributed :func:`build_two` run match one process; ``first`` stayed as it was."""
    got, want = section(rank0, "two"), reference_two()
    start = trained(build_two()[0])
    assert_close(got, want, "two adapters")
    assert_close(section(rank1, "two"), want, "two adapters on rank 1")
    first = [k for k in got if ".lora.first." in k]
    assert first and all(torch.equal(got[k], start[k]) for k in first)
    assert all(not torch.equal(got[k], start[k]) for k in got if ".lora.second." in k)


# The attention key bias adds the same q.b to every score of a query, which softmax ignores:
# its true gradient is 0, so AdamW (eps 1e-8) turns float noise of ~1e-10 into steps of up to
# lr. Its value depends on summation order and is not comparable across process counts.
NOISE_ONLY = ".attention.self.key.bias"


def assert_close(got: dict, want: dict, what: str, atol: float = 1e-5) -> None:
    """Same keys, and every tensor within ``atol`` (noise-only tensors skipped unless ``atol`` is 0)."""
    assert got.keys() == want.keys(), f"{what}: keys differ"
    for key in want:
        if key.endswith(NOISE_ONLY) and atol > 0:
            continue
        diff = (got[key].float() - want[key].float()).abs().max().item()
        assert diff <= atol, f"{what}: {key} differs by {diff:.2e}"
