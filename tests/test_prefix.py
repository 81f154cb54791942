"""Prefix tuning: key/value prefixes in every attention layer of encoders and decoders."""

from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import torch
from distributed import TRAIN_PRELUDE, run_script
from torch import nn

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.callbacks import PrefixTuning
from lightning_peft.methods import MethodError
from lightning_peft.methods.base import applied_methods, count_parameters, trainable_named_parameters
from lightning_peft.methods.prefix import PEFT_KEY, PrefixTuningConfig, find_prefix_encoder

from conftest import fit_recipe, random_batch, tiny_bert_classifier, tiny_gpt2, tiny_llama

P = 5


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _loader(labels: str, n: int = 4, **kw):
    batches = [random_batch(labels=labels, seed=i, batch=4, **kw) for i in range(n)]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def _randomize(model: nn.Module, std: float = 1.0, seed: int = 0) -> None:
    """Give the prefixes values far from their init so tests do not pass by accident."""
    _, encoder = find_prefix_encoder(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _llama_classifier(attn: str = "sdpa"):
    from transformers import LlamaForSequenceClassification

    cfg = tiny_llama().config
    cfg.num_labels = 3
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def _with_attn(model: nn.Module, attn: str) -> nn.Module:
    model.set_attn_implementation(attn)
    return model


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_trainable_count_is_layers_x_2_x_tokens_x_kv_width(family):
    make = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_classifier}[family]
    model = PrefixTuning(num_virtual_tokens=7).apply(make(num_layers=3))
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv_width = kv_heads * cfg.hidden_size // cfg.num_attention_heads
    if family == "llama":
        assert kv_width < cfg.hidden_size  # grouped-query attention: 2 kv heads for 4 query heads
    trainable, total = count_parameters(model)
    assert trainable == 3 * 2 * 7 * kv_width
    assert [n for n, _ in trainable_named_parameters(model)] == ["prefix_encoders.default.prefix"]
    assert all(
        not p.requires_grad for n, p in model.named_parameters() if n != "prefix_encoders.default.prefix"
    )


def test_projection_trains_embedding_and_mlp():
    model = PrefixTuning(num_virtual_tokens=P, projection_dim=16).apply(tiny_llama())
    width = 2 * 2 * 32  # layers x 2 x kv_width
    names = {n: p.numel() for n, p in trainable_named_parameters(model)}
    assert names == {
        "prefix_encoders.default.embedding": P * 64,
        "prefix_encoders.default.transform.0.weight": 64 * 16,
        "prefix_encoders.default.transform.0.bias": 16,
        "prefix_encoders.default.transform.2.weight": 16 * width,
        "prefix_encoders.default.transform.2.bias": width,
    }
    assert count_parameters(model)[0] == sum(names.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
        ({"num_virtual_tokens": -3}, "num_virtual_tokens must be a positive integer"),
        ({"num_virtual_tokens": 2.5}, "num_virtual_tokens must be a positive integer"),
        ({"num_virtual_tokens": True}, "num_virtual_tokens must be a positive integer"),
        ({"projection_dim": 0}, "projection_dim must be a positive integer or None"),
        ({"projection_dim": -8}, "projection_dim must be a positive integer or None"),
    ],
)
def test_bad_arguments_fail_fast(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixTuning(**kwargs)


def test_model_without_attention_layers_is_refused():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    with pytest.raises(ValueError, match="exactly one self-attention module per block"):
        PrefixTuning().apply(Mlp())
    with pytest.raises(ValueError, match="cannot find the attention layers"):
        PrefixTuning().apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_unsupported_attention_implementation_is_refused():
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation"):
        PrefixTuning().apply(model)


def test_apply_twice():
    model = tiny_llama()
    PrefixTuning(num_virtual_tokens=P).apply(model)
    before = model.prefix_encoders.default.prefix.clone()
    PrefixTuning(num_virtual_tokens=P).apply(model)  # same config: no-op
    assert torch.equal(model.prefix_encoders.default.prefix, before)
    with pytest.raises(ValueError, match="is already on this model"):
        PrefixTuning(num_virtual_tokens=P + 1).apply(model)
    wrapper = nn.ModuleDict({"inner": model})  # no record at its root: the prefixes are still found
    assert applied_methods(wrapper) == [PrefixTuningConfig(num_virtual_tokens=P)]


def test_meta_device_model_gets_prefixes_on_meta():
    from transformers import LlamaForCausalLM

    cfg = tiny_llama().config
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    PrefixTuning(num_virtual_tokens=P).apply(model)
    assert model.prefix_encoders.default.prefix.device.type == "meta"
    assert count_parameters(model)[0] == 2 * 2 * P * 32


# --------------------------------------------------------------------------- positions and cache
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_decoder_init_equals_base_model_reading_the_init_tokens_first(make, attn):
    """At init a decoder's prefixes are the cache of P real tokens at positions 0..P-1."""
    model = PrefixTuning(num_virtual_tokens=P).apply(_with_attn(make(), attn))
    base = _with_attn(make(), attn)
    batch = random_batch(batch=2, seq=9)
    ids = model.prefix_encoders.default.init_token_ids
    assert ids.shape == (P,)
    with torch.no_grad():
        ours = model(**batch).logits
        full = torch.cat([ids.unsqueeze(0).expand(2, -1), batch["input_ids"]], dim=1)
        reference = base(input_ids=full).logits[:, P:]
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, base(**batch).logits, atol=1e-3)  # the prefix does change outputs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_greedy_generate_equals_greedy_forward_loop(make, attn):
    module = CausalLM(_with_attn(make(), attn))
    PrefixTuning(num_virtual_tokens=P).apply(module)
    _randomize(module)
    batch = random_batch(batch=1, seq=6, seed=3)
    generated = module.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ids = batch["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            logits = module(input_ids=ids).logits  # full forward, no cache
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generated.tolist() == ids.tolist()


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = PrefixTuning(num_virtual_tokens=P).apply(tiny_llama())
    _randomize(model)
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 4)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    together = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    for row, p in enumerate(prompts):
        alone = model.generate(input_ids=p.unsqueeze(0), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert together[row, width:].tolist() == alone[0, len(p) :].tolist()


def test_encoder_positions_are_unchanged():
    """BERT keeps positions 0..T-1: the position hook is not installed on encoders."""
    model = PrefixTuning(num_virtual_tokens=P).apply(tiny_bert_classifier())
    assert not model.prefix_encoders.shift_positions
    seen = []
    handle = model.bert.embeddings.position_embeddings.register_forward_hook(
        lambda m, args, out: seen.append(args[0])
    )
    model(**random_batch())
    handle.remove()
    assert seen[0].flatten().tolist() == list(range(12))


# --------------------------------------------------------------------------- masks
def _padding_invariance(model: nn.Module, pad_id: int = 0) -> None:
    batch = random_batch(batch=3, seq=10, seed=5)
    lengths = [10, 6, 3]
    for row, n in enumerate(lengths):
        batch["input_ids"][row, n:] = pad_id
        batch["attention_mask"][row, n:] = 0
    with torch.no_grad():
        together = model(**batch).logits
        for row, n in enumerate(lengths):
            alone = model(input_ids=batch["input_ids"][row : row + 1, :n]).logits
            torch.testing.assert_close(together[row], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_invariance_bert_classifier(attn):
    model = PrefixTuning(num_virtual_tokens=P).apply(_with_attn(tiny_bert_classifier(), attn))
    _randomize(model)
    _padding_invariance(model)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_invariance_llama_classifier(attn):
    model = PrefixTuning(num_virtual_tokens=P).apply(_llama_classifier(attn))
    _randomize(model)
    _padding_invariance(model, pad_id=model.config.pad_token_id)


def test_padding_invariance_minilm(minilm_path):
    module = SequenceClassifier(minilm_path, num_labels=2)
    PrefixTuning(num_virtual_tokens=P).apply(module)
    module.eval()
    _padding_invariance(module.backbone)


def test_prefix_rows_are_always_attended_and_padding_never():
    model = PrefixTuning(num_virtual_tokens=P).apply(_with_attn(tiny_bert_classifier(), "eager"))
    _randomize(model, std=0.1)
    batch = random_batch(batch=2, seq=8)
    batch["attention_mask"][1, 5:] = 0
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    for weights in attentions:  # (B, heads, T, P + T)
        assert weights.shape[-1] == P + 8
        assert (weights[..., :P] > 0).all()
        assert (weights[1, :, :, P + 5 :] == 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


def test_gradient_checkpointing_still_reaches_the_prefixes():
    module = CausalLM(tiny_llama(), gradient_checkpointing=True)
    PrefixTuning(num_virtual_tokens=P).apply(module)
    module.train()
    module(**random_batch(labels="lm")).loss.backward()
    grad = module.backbone.prefix_encoders.default.prefix.grad
    assert grad is not None and grad.abs().sum() > 0


# --------------------------------------------------------------------------- training
def test_trains_sequence_classifier_with_frozen_base_bit_identical():
    module = SequenceClassifier(tiny_bert_classifier(), num_labels=2, lr=1e-2)
    callback = PrefixTuning(num_virtual_tokens=P)
    callback.apply(module)
    trainable = dict(trainable_named_parameters(module))
    assert set(trainable) == {
        "backbone.prefix_encoders.default.prefix",
        "backbone.classifier.weight",
        "backbone.classifier.bias",
    }
    before = {k: v.clone() for k, v in module.state_dict().items()}
    batch = random_batch(labels="cls", seed=9)
    module.eval()
    with torch.no_grad():
        out_before = module(**batch).logits
    _trainer(4).fit(module, train_dataloaders=_loader("cls"))
    module.eval()
    after = module.state_dict()
    for key in before:
        if key not in trainable:
            assert torch.equal(after[key], before[key]), key
    assert not torch.equal(
        after["backbone.prefix_encoders.default.prefix"], before["backbone.prefix_encoders.default.prefix"]
    )
    with torch.no_grad():
        assert not torch.allclose(module(**batch).logits, out_before)


def test_trains_causal_lm_with_frozen_base_bit_identical():
    module = CausalLM(tiny_llama(), lr=1e-2)
    trainer = _trainer(4)
    trainer.callbacks.append(PrefixTuning(num_virtual_tokens=P))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    batch = random_batch(labels="lm", seed=9)
    with torch.no_grad():
        base_logits = module(**batch).logits
    trainer.fit(module, train_dataloaders=_loader("lm"))
    module.eval()
    trainable = {n for n, _ in trainable_named_parameters(module)}
    assert trainable == {"backbone.prefix_encoders.default.prefix"}
    after = module.state_dict()
    assert set(after) == set(before) | trainable
    for key in before:
        assert torch.equal(after[key], before[key]), key
    with torch.no_grad():
        assert not torch.allclose(module(**batch).logits, base_logits)


def test_four_bit_base_keeps_the_prefix_mlp_in_full_precision():
    pytest.importorskip("bitsandbytes")
    from lightning_peft.plugins import FourBitPrecision

    module = CausalLM(tiny_llama(), lr=1e-2)
    callback = PrefixTuning(num_virtual_tokens=P, projection_dim=8)
    callback.apply(module)
    before = {n: p.detach().clone() for n, p in trainable_named_parameters(module)}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        plugins=[FourBitPrecision("nf4", compute_dtype=torch.bfloat16)],
    )
    trainer.fit(module, train_dataloaders=_loader("lm", n=2))
    assert type(module.backbone.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    after = dict(trainable_named_parameters(module))
    assert set(after) == set(before)
    assert all(p.dtype == torch.float32 and not torch.equal(p, before[n]) for n, p in after.items())
    assert type(module.backbone.prefix_encoders.default.transform[2]) is nn.Linear


def test_projection_trains_then_folds_into_identical_plain_prefixes():
    module = CausalLM(tiny_llama(), lr=1e-2)
    callback = PrefixTuning(num_virtual_tokens=P, projection_dim=32)
    trainer = _trainer(3)
    trainer.callbacks.append(callback)
    trainer.fit(module, train_dataloaders=_loader("lm"))
    module.eval()
    batch = random_batch(labels="lm", seed=11)
    with torch.no_grad():
        projected = module(**batch).logits
    callback.merge(module)
    assert [n for n, _ in trainable_named_parameters(module)] == ["backbone.prefix_encoders.default.prefix"]
    assert count_parameters(module)[0] == 2 * 2 * P * 32
    assert applied_methods(module) == [PrefixTuningConfig(num_virtual_tokens=P, projection_dim=None)]
    with torch.no_grad():
        folded = module(**batch).logits
    torch.testing.assert_close(folded, projected, rtol=0, atol=1e-6)
    callback.unmerge(module)
    assert applied_methods(module) == [PrefixTuningConfig(num_virtual_tokens=P, projection_dim=32)]
    assert "backbone.prefix_encoders.default.transform.2.weight" in dict(trainable_named_parameters(module))
    with torch.no_grad():
        torch.testing.assert_close(module(**batch).logits, projected, rtol=0, atol=0)


def test_projection_starts_from_the_same_activations():
    """The MLP's last layer is fitted so projected prefixes also start as real-token activations."""
    model = PrefixTuning(num_virtual_tokens=P, projection_dim=16).apply(tiny_llama())
    assert model.prefix_encoders.default.projected
    base = tiny_llama()
    batch = random_batch(batch=2, seq=9)
    ids = model.prefix_encoders.default.init_token_ids
    with torch.no_grad():
        full = torch.cat([ids.unsqueeze(0).expand(2, -1), batch["input_ids"]], dim=1)
        torch.testing.assert_close(
            model(**batch).logits, base(input_ids=full).logits[:, P:], rtol=0, atol=1e-4
        )


def test_checkpoint_holds_only_prefix_and_head_and_rebuilds(tmp_path):
    tiny_bert_classifier().save_pretrained(tmp_path / "base")
    module = SequenceClassifier(str(tmp_path / "base"), num_labels=2, lr=1e-2)
    trainer = _trainer(3)
    trainer.callbacks.append(PrefixTuning(num_virtual_tokens=P))
    trainer.fit(module, train_dataloaders=_loader("cls"))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    state = torch.load(tmp_path / "run.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(state) == {
        "backbone.prefix_encoders.default.prefix",
        "backbone.classifier.weight",
        "backbone.classifier.bias",
    }
    loaded = SequenceClassifier.load_from_checkpoint(tmp_path / "run.ckpt").eval()
    module.eval()
    batch = random_batch(labels="cls", seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, module(**batch).logits, rtol=0, atol=0)


def test_delta_after_folding_holds_only_plain_prefixes_and_reloads(tmp_path):
    from safetensors.torch import load_file

    import lightning_peft

    model = PrefixTuning(num_virtual_tokens=P, projection_dim=16).apply(tiny_llama())
    _randomize(model, std=0.5)
    batch = random_batch()
    with torch.no_grad():
        projected = model(**batch).logits
    lightning_peft.merge(model)
    lightning_peft.save_delta(model, tmp_path)
    (data,) = tmp_path.glob("*.safetensors")
    assert set(load_file(str(data))) == {"prefix_encoders.default.prefix"}
    fresh = lightning_peft.load_delta(tiny_llama(), tmp_path)
    assert applied_methods(fresh) == [PrefixTuningConfig(num_virtual_tokens=P)]
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, projected, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_ddp_two_processes_keep_ranks_identical(tmp_path):
    ranks = run_script(
        TRAIN_PRELUDE
        + """
from conftest import tiny_llama
from lightning_peft import CausalLM
from lightning_peft.callbacks import PrefixTuning
from lightning_peft.methods.base import trainable_named_parameters

module = CausalLM(tiny_llama(), lr=1e-2)
before = {k: v.clone() for k, v in module.state_dict().items()}
t = trainer(3, callbacks=[PrefixTuning(num_virtual_tokens=4)])
t.fit(module, train_dataloaders=loader("lm"))
trainable = dict(trainable_named_parameters(module))
after = module.state_dict()
frozen_same = all(torch.equal(after[k], before[k]) for k in before)
save_rank(t, {**trainable, "frozen_same": torch.tensor(frozen_same)})
""",
        tmp_path,
    )
    assert len(ranks) == 2
    r0, r1 = ranks
    assert set(r0) == set(r1) == {"backbone.prefix_encoders.default.prefix", "frozen_same"}
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ on {key}"
    assert bool(r0["frozen_same"])


# --------------------------------------------------------------------------- Hugging Face PEFT
def _write_peft(tmp_path, config, state):
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "adapter_model.safetensors"))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_peft_loads_the_export_with_equal_logits(tmp_path, make):
    peft = pytest.importorskip("peft")
    model = PrefixTuning(num_virtual_tokens=P).apply(make())
    _randomize(model)
    config, state = PrefixTuningConfig(num_virtual_tokens=P).to_peft(model)
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert set(state) == {PEFT_KEY}
    kv_width = model.prefix_encoders.default.kv_width
    assert state[PEFT_KEY].shape == (P, 2 * 2 * kv_width)
    assert config["token_dim"] == kv_width and config["num_layers"] == 2
    _write_peft(tmp_path, config, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path))
        batch = random_batch(batch=2, seq=10)
        batch["attention_mask"][1, 7:] = 0
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, theirs(**batch).logits, rtol=0, atol=1e-5)
            # PEFT's own generate drops the prefix under transformers 5 (see docs); its greedy
            # forward loop matches our cached generate token for token.
            ids = batch["input_ids"][:1, :6]
            for _ in range(6):
                ids = torch.cat([ids, theirs(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    ours = model.generate(input_ids=ids[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ours.tolist() == ids.tolist()


def test_peft_round_trip_through_from_peft(tmp_path):
    model = PrefixTuning(num_virtual_tokens=P).apply(tiny_llama())
    _randomize(model)
    config, state = PrefixTuningConfig().to_peft(model)
    method = PrefixTuningConfig.from_peft_config(json.loads(json.dumps(config)))
    assert method == PrefixTuningConfig(num_virtual_tokens=P)
    fresh = method.apply(tiny_llama())
    mapped = method.from_peft(fresh, state)
    assert set(mapped) == {"prefix_encoders.default.prefix"}
    fresh.load_state_dict(mapped, strict=False)
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="PREFIX_TUNING"):
        PrefixTuningConfig.from_peft_config({**config, "peft_type": "LORA"})
    with pytest.raises(ValueError, match="num_transformer_submodules"):
        PrefixTuningConfig.from_peft_config({**config, "num_transformer_submodules": 2})
    with pytest.raises(ValueError, match="shape"):
        method.from_peft(fresh, {PEFT_KEY: torch.zeros(P + 1, 4)})


def test_public_export_and_import_peft_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    import lightning_peft

    module = CausalLM(tiny_llama())
    PrefixTuning(num_virtual_tokens=P, projection_dim=16).apply(module)
    _randomize(module, std=0.3)
    lightning_peft.merge(module)  # fold the projection: PEFT stores the computed prefixes
    lightning_peft.export_peft(module, tmp_path)
    batch = random_batch()
    batch["attention_mask"][0, 9:] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = module(**batch).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))(**batch).logits
        back = lightning_peft.import_peft(tiny_llama(), tmp_path)(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(back, ours, rtol=0, atol=0)


def test_projected_prefixes_export_as_computed_values():
    model = PrefixTuning(num_virtual_tokens=P, projection_dim=8).apply(tiny_gpt2())
    _, state = PrefixTuningConfig(num_virtual_tokens=P, projection_dim=8).to_peft(model)
    with torch.no_grad():
        assert torch.equal(state[PEFT_KEY], model.prefix_encoders.default.flat())


def test_no_peft_form_for_encoders_and_classifiers():
    bert = PrefixTuning(num_virtual_tokens=P).apply(tiny_bert_classifier())
    with pytest.raises(MethodError, match="causal language models only.*save_delta"):
        PrefixTuningConfig(num_virtual_tokens=P).to_peft(bert)
    llama_cls = PrefixTuning(num_virtual_tokens=P).apply(_llama_classifier())
    with pytest.raises(MethodError, match="causal language models only"):
        PrefixTuningConfig(num_virtual_tokens=P).to_peft(llama_cls)


# --------------------------------------------------------------------------- recipe
@pytest.mark.slow
def test_minilm_recipe_loads_and_trains_two_steps(tmp_path, monkeypatch, capsys):
    overrides = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
    fit_recipe("minilm-sentiment/prefix.yaml", tmp_path, monkeypatch, *overrides)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "trainable params:" in x)
    assert "method: prefix" in line
    assert "92,930" in line  # 6 layers x 2 x 20 tokens x 384 + the 2-class head (770)
    assert "last validation metrics" in out
