"""Every registered method through the same properties: a new method joins by registering.

Each method runs with its contract's ``example`` options on small models built from configs.
Properties: a callback exists; only its tensors train; identity at init where the method
promises it; delta round trip; a foreign base is refused; exact resume (weights and
optimizer state); training over a 4-bit base; a PEFT round trip where the method maps to
PEFT; merge equal to un-merged where it merges, and a clear refusal where it does not; bad
arguments give one clear error. Distributed runs (DDP, FSDP2) of every registered method
live in ``test_strategies.py`` and ``test_fsdp2.py`` (their method list is the registry).
"""

from __future__ import annotations

import dataclasses

import lightning as L
import peft_runs
import pytest
import torch

import lightning_peft
from lightning_peft import (
    SequenceClassifier,
    export_peft,
    import_peft,
    load_delta,
    merge,
    save_delta,
    unmerge,
)
from lightning_peft import callbacks as cb
from lightning_peft.callbacks import MethodCallback
from lightning_peft.core.layers import is_4bit
from lightning_peft.core.ownership import MODULE, owned_tensors
from lightning_peft.methods import MethodError
from lightning_peft.methods.base import registry, trainable_named_parameters
from lightning_peft.persistence import FingerprintMismatchError, delta_state_dict, fingerprint

from conftest import random_batch, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = sorted(registry())


def _callback(name: str, **extra):
    cls = registry()[name]
    return getattr(cb, cls.callback_name)(**{**cls.example, **extra})


def _classifier(seed: int = 0) -> SequenceClassifier:
    return SequenceClassifier(peft_runs.classifier(seed), num_labels=2, lr=1e-2, schedule="constant")


def _batch() -> dict[str, torch.Tensor]:
    sample = peft_runs.samples(4)
    return {k: torch.stack([s[k] for s in sample]) for k in sample[0]}


def _logits(model, batch=None) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**(batch or _batch())).logits


def _perturb(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for owned in owned_tensors(model):
            if owned.tensor.is_floating_point():
                owned.tensor.add_(torch.randn(owned.tensor.shape, generator=g) * 0.05)


def _applied(name: str, seed: int = 0) -> SequenceClassifier:
    module = _classifier(seed)
    torch.manual_seed(1)
    _callback(name).apply(module)
    return module


# --------------------------------------------------------------------------- the properties
@pytest.mark.parametrize("name", NAMES)
def test_a_callback_exists_for_every_registered_method(name):
    cls = registry()[name]
    callback = getattr(cb, cls.callback_name)
    assert issubclass(callback, MethodCallback) and issubclass(callback, cls)
    assert cls.callback_name in cb.__all__
    for field in dataclasses.fields(cls):
        assert f"    {field.name}: " in callback.__doc__, f"{field.name} is not documented"


@pytest.mark.parametrize("name", NAMES)
def test_only_its_tensors_train(name):
    module = _applied(name)
    trainable = dict(trainable_named_parameters(module))
    assert trainable, "the method trains nothing"
    owners = {id(o.tensor): o.adapter for o in owned_tensors(module)}
    assert {owners.get(id(p)) for p in trainable.values()} <= {"default", MODULE}
    assert {n for n, p in module.named_parameters() if p.requires_grad} == set(trainable)
    before = {n: t.detach().clone() for n, t in module.state_dict(keep_vars=True).items()}
    peft_runs.trainer(2, callbacks=[_callback(name)]).fit(module, datamodule=peft_runs.loader(4))
    after = module.state_dict(keep_vars=True)
    owned = set(delta_state_dict(module))
    frozen_moved = [n for n in before if n not in owned and not torch.equal(before[n], after[n])]
    assert not frozen_moved, f"frozen tensors changed: {frozen_moved[:5]}"
    assert any(not torch.equal(before[n], after[n]) for n in trainable), "no trainable tensor moved"


@pytest.mark.parametrize("name", NAMES)
def test_identity_at_init_where_promised(name):
    if not registry()[name].starts_as_base:
        pytest.skip(f"{name} adds inputs: it does not start as the base model")
    for factory in (peft_runs.classifier, tiny_llama):
        base = factory()
        batch = random_batch()
        ref = _logits(base, batch)
        torch.manual_seed(1)
        _callback(name).apply(base)
        torch.testing.assert_close(_logits(base, batch), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_delta_round_trip(name, tmp_path):
    module = _applied(name)
    _perturb(module)
    save_delta(module, tmp_path)
    fresh = load_delta(_classifier(), tmp_path)
    assert [m.to_dict() for m in lightning_peft.applied_methods(fresh)] == [
        m.to_dict() for m in lightning_peft.applied_methods(module)
    ]
    torch.testing.assert_close(_logits(fresh), _logits(module), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_a_foreign_base_is_refused_and_left_untouched(name, tmp_path):
    module = _applied(name)
    _perturb(module)
    save_delta(module, tmp_path)
    if not fingerprint(module)["count"]:
        pytest.skip(f"{name} trains every tensor: there is no frozen base to tell apart")
    other = _classifier(seed=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(FingerprintMismatchError, match="differs from the one"):
        load_delta(other, tmp_path)
    assert lightning_peft.applied_methods(other) == []
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", NAMES)
def test_exact_resume_of_weights_and_optimizer_state(name, tmp_path):
    # two steps per epoch; a fit that ended at an epoch's end resumes exactly at the next one
    straight = _applied(name)
    t4 = peft_runs.trainer(-1, callbacks=[_callback(name)], max_epochs=2)
    t4.fit(straight, datamodule=peft_runs.loader(4))
    first = _applied(name)
    t2 = peft_runs.trainer(-1, callbacks=[_callback(name)], max_epochs=1)
    t2.fit(first, datamodule=peft_runs.loader(4))
    t2.save_checkpoint(tmp_path / "two.ckpt")
    resumed = _classifier()  # a fresh base: the checkpoint rebuilds the method
    tr = peft_runs.trainer(-1, callbacks=[_callback(name)], max_epochs=2)
    tr.fit(resumed, datamodule=peft_runs.loader(4), ckpt_path=tmp_path / "two.ckpt")
    assert tr.global_step == 4
    want, got = delta_state_dict(straight), delta_state_dict(resumed)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    moments_want = [s["exp_avg"] for s in t4.optimizers[0].state.values()]
    moments_got = [s["exp_avg"] for s in tr.optimizers[0].state.values()]
    assert len(moments_want) == len(moments_got) == len(dict(trainable_named_parameters(straight)))
    for a, b in zip(moments_want, moments_got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_trains_over_a_4bit_base(name):
    if registry()[name].in_place and not registry()[name].example:
        pytest.skip(f"{name} trains every weight: nothing stays frozen to quantize")
    module = _applied(name)
    start = {k: v.clone() for k, v in delta_state_dict(module).items()}
    trainer = peft_runs.trainer(2, callbacks=[_callback(name)], plugins=[peft_runs.four_bit()])
    trainer.fit(module, datamodule=peft_runs.loader(4))
    assert any(is_4bit(m) for m in module.modules()), "no base layer was quantized"
    trained = dict(trainable_named_parameters(module))
    assert all(p.dtype == torch.float32 for p in trained.values())
    moved = [n for n, t in delta_state_dict(module).items() if n in start and not torch.equal(t, start[n])]
    assert moved, "nothing trained over the 4-bit base"


def _lm(name: str):
    model = lightning_peft.CausalLM(tiny_llama())
    torch.manual_seed(1)
    _callback(name).apply(model)
    _perturb(model)
    return model


@pytest.mark.parametrize("name", NAMES)
def test_peft_round_trip_where_the_method_maps_to_peft(name, tmp_path):
    peft = pytest.importorskip("peft")
    model = _lm(name)
    config = registry()[name](**registry()[name].example)
    try:
        config.to_peft(model)
    except MethodError as err:
        assert "save_delta" in str(err), "a refusal must name what works instead"
        pytest.skip(f"{name} has no PEFT form")
    export_peft(model, tmp_path)
    batch = random_batch(labels="lm")
    want = _logits(model, batch)
    ours = import_peft(lightning_peft.CausalLM(tiny_llama()), tmp_path)
    torch.testing.assert_close(_logits(ours, batch), want, rtol=0, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        logits = theirs(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(logits[:, -want.shape[1] :], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_merge_equals_unmerged_where_it_merges(name):
    model = _lm(name)
    batch = random_batch()
    ref = _logits(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        merge(model)
    except MethodError as err:
        assert "save_delta" in str(err), "a refusal must name what works instead"
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), (
            "a refused merge changed weights"
        )
        pytest.skip(f"{name} cannot merge")
    torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=1e-5)
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_give_one_clear_error(name):
    cls = registry()[name]
    for field in dataclasses.fields(cls):
        with pytest.raises(ValueError, match=field.name):
            cls(**{**cls.example, field.name: object()})


def test_every_registered_method_runs_under_ddp_and_fsdp2():
    """The distributed tests take their method list from the registry (see ``peft_runs.METHODS``)."""
    assert set(registry()) <= set(peft_runs.METHODS)


def test_a_method_with_own_frozen_state_saves_it_and_keeps_it_out_of_the_fingerprint(tmp_path):
    """A method may own tensors it never trains (fixed random projections): declared, saved, not base."""
    from torch import nn

    from lightning_peft.methods import REGISTRY, Method, declare_state, declare_trainable, register

    class Projected(nn.Module):
        def __init__(self, inner: nn.Module, width: int, adapter: str) -> None:
            super().__init__()
            self.inner = inner
            self.projection = nn.Parameter(torch.randn(width, width) * 0.01, requires_grad=False)
            self.gate = nn.Parameter(torch.zeros(width))
            declare_state(self, ["projection"], adapter=adapter)
            declare_trainable(self, ["gate"], adapter=adapter)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., width)
            h = self.inner(x)
            return h + (h @ self.projection) * self.gate

    @dataclasses.dataclass
    class ProjectedConfig(Method):
        """Test-only method: a fixed random projection after the final norm, gated by a trained vector."""

        name = "test_projected"
        callback_name = "TestProjected"

        def inject(self, model: nn.Module) -> None:
            owner = next(m for m in model.modules() if hasattr(m, "norm") and hasattr(m, "layers"))
            owner.norm = Projected(owner.norm, owner.norm.weight.shape[0], self.adapter_name)

    register(ProjectedConfig)
    try:
        model = ProjectedConfig().apply(tiny_llama())
        assert [n for n, _ in trainable_named_parameters(model)] == ["model.norm.gate"]
        assert set(delta_state_dict(model)) == {"model.norm.projection", "model.norm.gate"}
        names = {e["name"] for e in fingerprint(model)["tensors"]}
        assert "model.norm.projection" not in names and "model.norm.inner.weight" in names
        _perturb(model)
        save_delta(model, tmp_path)
        fresh = load_delta(tiny_llama(), tmp_path)
        torch.testing.assert_close(fresh.model.norm.projection, model.model.norm.projection, rtol=0, atol=0)
        batch = random_batch()
        torch.testing.assert_close(_logits(fresh, batch), _logits(model, batch), rtol=0, atol=0)
    finally:
        REGISTRY.pop(ProjectedConfig.name, None)


def test_a_lightning_trainer_injects_before_the_optimizer_sees_parameters():
    """Property of the shell every method relies on: the optimizer holds exactly the trainable tensors."""
    module = _classifier()
    callback = _callback("lora")
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(module, datamodule=peft_runs.loader(4))
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for _, p in trainable_named_parameters(module)}
