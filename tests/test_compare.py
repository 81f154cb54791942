"""``lightning-peft compare``: real runs of tiny recipes, failures, argument errors, and the plain functions."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lightning_peft
from lightning_peft.cli import main
from lightning_peft.compare import (
    COLUMNS,
    aggregate,
    compare_main,
    failure_reason,
    format_mean_std,
    markdown_table,
    mean_std,
    plan_runs,
    read_csv,
    run_command,
    split_arguments,
    write_csv,
)
from lightning_peft.compare_measure import median_after_warmup
from lightning_peft.compare_plots import PLOTS

PACKAGE_ROOT = Path(lightning_peft.__file__).parent.parent  # where the runs must import it from too
PNG = b"\x89PNG\r\n\x1a\n"

ROWS = [
    ("great food", 1),
    ("awful service", 0),
    ("loved every bite", 1),
    ("never again", 0),
    ("superb", 1),
    ("cold and bland", 0),
    ("friendly staff", 1),
    ("rude and slow", 0),
]

RECIPE = """\
seed_everything: 0
model:
  class_path: lightning_peft.SequenceClassifier
  init_args:
    model: embedded:all-MiniLM-L6-v2
    num_labels: 2
    lr: {lr}
data:
  class_path: lightning_peft.data.TextClassificationData
  init_args:
    train_file: data/train.jsonl
    val_file: data/val.jsonl
    max_length: 16
    batch_size: 4
trainer:
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - {method}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        monitor: val_acc
        mode: max
        save_last: true
"""
LORA = (
    "{class_path: lightning_peft.callbacks.LoRA, init_args: {r: 4, alpha: 8, target_modules: [query, value]}}"
)
ADAPTER = "{class_path: lightning_peft.callbacks.Adapter, init_args: {bottleneck: 8}}"


@pytest.fixture
def recipes(tmp_path, monkeypatch) -> Path:
    """A folder with tiny MiniLM recipes (8 examples, 2 batches); runs import the package the tests do."""
    folder = tmp_path / "recipes"
    (folder / "data").mkdir(parents=True)
    lines = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS)
    (folder / "data" / "train.jsonl").write_text(lines)
    (folder / "data" / "val.jsonl").write_text(lines)
    (folder / "lora.yaml").write_text(RECIPE.format(lr=1e-3, method=LORA))
    (folder / "adapter.yaml").write_text(RECIPE.format(lr=1e-3, method=ADAPTER))
    (folder / "broken.yaml").write_text(RECIPE.format(lr=-1.0, method=LORA))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    )
    return folder


# --------------------------------------------------------------------------- real runs
def test_two_recipes_two_seeds(recipes, tmp_path, capsys):
    out = tmp_path / "out"
    compare_main(
        [str(recipes / "lora.yaml"), str(recipes / "adapter.yaml"), "--out", str(out), "--seeds", "2"]
    )
    rows = read_csv(out / "results.csv")
    assert [(r["recipe"], r["seed"]) for r in rows] == [
        ("lora", 0),
        ("lora", 1),
        ("adapter", 0),
        ("adapter", 1),
    ]
    assert list(rows[0]) == list(COLUMNS)
    for row in rows:
        assert row["error"] == "", row
        assert row["method"] == row["recipe"]
        assert isinstance(row["trainable_params"], int) and row["trainable_params"] > 0
        assert 0 < row["trainable_pct"] <= 100
        assert math.isclose(row["trainable_pct"], 100 * row["trainable_params"] / 22_700_000, rel_tol=0.05)
        assert row["val_metric"] == "val_acc" and 0.0 <= row["val_value"] <= 1.0
        assert 100 < row["peak_mem_mib"] < 64_000  # the run's own resident peak, MiniLM loaded
        assert 0 < row["step_time_ms"] < 60_000
        assert isinstance(row["checkpoint_bytes"], int) and row["checkpoint_bytes"] > 10_000
        assert 0 < row["latency_ms"] < 10_000
        assert row["wall_s"] > row["step_time_ms"] / 1000
        # LoRA merges (timed before and after); adapters have nothing to merge
        assert (row["latency_unmerged_ms"] is not None) == (row["recipe"] == "lora")
    assert rows[0]["trainable_params"] == rows[1]["trainable_params"] != rows[2]["trainable_params"]

    table = (out / "results.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(lines) == {"recipe", "lora", "adapter"}
    for recipe in ("lora", "adapter"):
        assert "±" in lines[recipe] and "| 2/2 |" in lines[recipe]
    for name in PLOTS.values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    assert {p.name for p in (out / "logs").iterdir()} == {
        f"{r}-seed{s}.log" for r in ("lora", "adapter") for s in (0, 1)
    }

    # the seed and the measuring callback were added after the recipe's own callbacks
    config = yaml.safe_load((out / "runs" / "lora-seed1" / "config.yaml").read_text())
    assert config["seed_everything"] == 1
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == [
        "lightning_peft.callbacks.LoRA",
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "lightning_peft.compare_measure.Measure",
    ]
    assert "| lora |" in capsys.readouterr().out
    # merging for the latency came after the checkpoints were written: they load onto a fresh base
    module = lightning_peft.SequenceClassifier.load_from_checkpoint(
        out / "runs" / "lora-seed0" / "checkpoints" / "last.ckpt", map_location="cpu"
    )
    assert [m.name for m in lightning_peft.applied_methods(module)] == ["lora"]


def test_a_failing_run_is_recorded_and_the_others_continue(recipes, tmp_path, capsys):
    out = tmp_path / "out"
    compare_main([str(recipes / "broken.yaml"), str(recipes / "lora.yaml"), "--out", str(out)])
    broken, lora = read_csv(out / "results.csv")
    assert broken["recipe"] == "broken" and broken["error"].startswith("exit code 1:")
    assert "lr must be positive" in broken["error"] and broken["val_value"] is None
    assert broken["wall_s"] > 0
    assert lora["error"] == "" and lora["val_value"] is not None
    err = capsys.readouterr().err
    assert "broken seed 0 failed" in err and str(out / "logs" / "broken-seed0.log") in err
    assert "| broken | " in (out / "results.md").read_text() and "| 0/1 |" in (out / "results.md").read_text()


ARGUMENT_ERRORS = [
    (["--out", "o"], "no recipes given"),
    (["recipes/lora.yaml", "--out", "afile"], "exists and is not a folder"),
    (["missing.yaml", "--out", "o"], "recipe not found: missing.yaml"),
    (["recipes/lora.yaml", "--out", "o", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["recipes/lora.yaml", "--seeds", "x", "--out", "o"], "argument --seeds: invalid int value: 'x'"),
    (["recipes/lora.yaml"], "the following arguments are required: --out"),
]


def _one_line(stderr: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-peft compare: error: "), stderr
    assert message in lines[0]


@pytest.mark.parametrize(("args", "message"), ARGUMENT_ERRORS[:2])
def test_argument_errors_from_the_command_line(args, message, recipes, tmp_path):
    (tmp_path / "afile").write_text("x")
    cmd = [sys.executable, "-m", "lightning_peft.cli", "compare", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    _one_line(done.stderr, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "message"), ARGUMENT_ERRORS[2:])
def test_argument_errors(args, message, recipes, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["compare", *args])
    assert info.value.code == 2
    _one_line(capsys.readouterr().err, message)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- plain functions
def test_median_after_warmup():
    assert median_after_warmup([], 5) is None
    assert median_after_warmup([7.0], 5) == 7.0
    assert median_after_warmup([100.0, 1.0, 2.0, 3.0], 5) == 2.5  # warm-up takes at most half
    assert median_after_warmup([100.0, 90.0, *range(1, 9)], 2) == 4.5
    assert median_after_warmup([3.0, 1.0, 2.0], 0) == 2.0


def test_mean_std_and_format():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample standard deviation
    assert mean_std([None, 4.0]) == (4.0, None)
    assert mean_std([]) == (None, None)
    assert format_mean_std(0.92345, 0.0041, 3) == "0.923 ± 0.004"
    assert format_mean_std(3 * 2**20, None, 2, 1 / 2**20) == "3.00"
    assert format_mean_std(None, None, 2) == ""


def _row(recipe, seed, value, error="", **extra):
    row = dict.fromkeys(COLUMNS)
    row.update(recipe=recipe, method="lora", seed=seed, val_metric="val_acc", val_value=value, error=error)
    row.update(trainable_pct=1.5, wall_s=10.0 + seed, **extra)
    return row


def test_aggregate_and_markdown(tmp_path):
    rows = [
        _row("a", 0, 0.8, latency_ms=2.0),
        _row("a", 1, 0.9, latency_ms=4.0),
        _row("a", 2, None, error="exit code 1: boom", latency_ms=100.0),
        _row("b", 0, 0.5),
    ]
    a, b = aggregate(rows)
    assert (a["recipe"], a["ok"], a["runs"], a["values"]) == ("a", 2, 3, [0.8, 0.9])
    assert a["val_value"][0] == pytest.approx(0.85) and a["val_value"][1] == pytest.approx(0.0707107)
    assert a["latency_ms"] == (3.0, pytest.approx(2**0.5))  # the failed run is left out
    assert a["latency_unmerged_ms"] == (None, None)
    assert b["val_value"] == (0.5, None) and b["ok"] == 1
    table = markdown_table([a, b]).splitlines()
    assert len(table) == 4 and table[1].startswith("|---|")
    assert "| a | lora | 2/3 | 1.5 | val_acc | 0.8500 ± 0.0707 |" in table[2]
    assert "| b | lora | 1/1 | 1.5 | val_acc | 0.5000 |" in table[3] and "±" not in table[3].split("|")[6]

    write_csv(list(reversed(rows)), tmp_path / "r.csv")
    back = read_csv(tmp_path / "r.csv")
    assert [(r["recipe"], r["seed"]) for r in back] == [("b", 0), ("a", 0), ("a", 1), ("a", 2)]
    assert back[1]["val_value"] == 0.8 and back[1]["latency_unmerged_ms"] is None and back[3]["error"]


def test_failure_reason():
    parse_error = 'usage: cli.py fit\ntip: ...\nerror: Parser key "trainer.max_steps":\n  Expected an int. Got value: abc\n'
    assert failure_reason(2, parse_error) == (
        'exit code 2: error: Parser key "trainer.max_steps": Expected an int. Got value: abc'
    )
    nested = "Traceback...\nValueError: lr must be positive\nTraceback...\nValueError: Does not validate\n"
    nested += "Subtypes: [...]\nErrors:\n  - lr must be positive, got -1.0\n  - Expected None\n"
    assert (
        failure_reason(1, nested)
        == "exit code 1: ValueError: Does not validate lr must be positive, got -1.0"
    )
    assert failure_reason(1, "Traceback\n  x\ntorch.OutOfMemoryError: CUDA out of memory\n").endswith(
        "torch.OutOfMemoryError: CUDA out of memory"
    )
    assert failure_reason(-9, "loading\n") == "killed by SIGKILL: loading"
    assert failure_reason(3, "") == "exit code 3: no output"
    assert len(failure_reason(1, "RuntimeError: " + "x" * 500)) == 200


def test_arguments_and_plan(recipes):
    own, overrides = split_arguments(
        [
            "a.yaml",
            "--trainer.max_steps",
            "3",
            "b.yaml",
            "--out=o",
            "--seeds",
            "2",
            "--x=1",
            "--flag",
            "--y",
            "-1",
        ]
    )
    assert own == ["a.yaml", "b.yaml", "--out=o", "--seeds", "2"]
    assert overrides == ["--trainer.max_steps", "3", "--x=1", "--flag", "--y", "-1"]

    runs = plan_runs(["recipes/lora.yaml", "recipes/adapter.yaml"], 2)
    assert [(r.recipe, r.seed) for r in runs] == [("lora", 0), ("adapter", 0), ("lora", 1), ("adapter", 1)]
    assert runs[0].path == recipes / "lora.yaml" and runs[0].name == "lora-seed0"
    other = recipes / "other"
    other.mkdir()
    (other / "lora.yaml").write_text("{}")
    same_stem = plan_runs(["recipes/lora.yaml", "recipes/other/lora.yaml"], 1)
    assert [r.recipe for r in same_stem] == ["recipes/lora.yaml", "recipes/other/lora.yaml"]
    assert same_stem[1].name == "recipes_other_lora.yaml-seed0"
    shipped = plan_runs(["minilm-sentiment/lora.yaml"], 1)[0]  # a recipe shipped in the package
    assert shipped.path.is_file() and shipped.recipe == "lora"

    command = run_command(runs[3], Path("run"), ["--trainer.max_steps=3", "--seed_everything=9"])
    assert command[1:6] == ["-m", "lightning_peft.cli", "fit", "--config", str(recipes / "adapter.yaml")]
    assert command[-3:] == [  # the run's seed wins over an override's
        "--seed_everything=9",
        "--seed_everything=1",
        "--trainer.callbacks+=lightning_peft.compare_measure.Measure",
    ]
    with pytest.raises(ValueError, match="given twice"):
        plan_runs(["recipes/lora.yaml", str(recipes / "lora.yaml")], 1)
    for bad, message in (
        ([], "no recipes"),
        (["recipes/lora.yaml"], "at least 1"),
        (["nope.yaml"], "not found"),
    ):
        with pytest.raises(ValueError, match=message):
            plan_runs(bad, 0 if bad == ["recipes/lora.yaml"] else 1)
