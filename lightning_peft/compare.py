"""``lightning-peft compare``: several recipes measured side by side on the user's own task.

``lightning-peft compare RECIPE.yaml [RECIPE.yaml ...] --out DIR [--seeds N] [fit overrides]``
runs ``lightning-peft fit`` once per recipe and seed, each in its own subprocess (so one run's
memory peak never mixes with another's), one after another. The parent appends the
:class:`~lightning_peft.compare_measure.Measure` callback to every run
(``--trainer.callbacks+=lightning_peft.compare_measure.Measure``) and names, in the
``LIGHTNING_PEFT_COMPARE_OUT`` environment variable, the JSON file the callback writes when
training ends. The parent reads that file, adds the run's wall time, and writes
``DIR/results.csv`` (one row per run), ``DIR/results.md`` (mean ± std per recipe) and the plots
of :mod:`lightning_peft.compare_plots`.

Everything here except :func:`execute` and :func:`compare_main` is a plain function of plain
data (run planning, failure reasons, aggregation, CSV and markdown), tested without a subprocess.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from tqdm import tqdm

from lightning_peft.compare_measure import MEASURE_ENV, Measure
from lightning_peft.compare_plots import write_plots
from lightning_peft.hub import find_recipe

__all__ = [
    "COLUMNS",
    "MEASURE_ENV",
    "Measure",
    "Run",
    "aggregate",
    "compare_main",
    "execute",
    "failure_reason",
    "format_mean_std",
    "markdown_table",
    "mean_std",
    "plan_runs",
    "read_csv",
    "run_command",
    "split_arguments",
    "write_csv",
    "write_markdown",
]

COLUMNS = (
    "recipe",
    "method",
    "seed",
    "trainable_params",
    "trainable_pct",
    "val_metric",
    "val_value",
    "peak_mem_mib",
    "step_time_ms",
    "checkpoint_bytes",
    "latency_ms",
    "latency_unmerged_ms",
    "wall_s",
    "error",
)
"""The columns of ``results.csv``, in order."""

# measured columns summarised as mean ± std: (column, markdown header, decimals, scale)
_SUMMARY = (
    ("val_value", "best value", 4, 1.0),
    ("peak_mem_mib", "peak memory (MiB)", 0, 1.0),
    ("step_time_ms", "step (ms)", 1, 1.0),
    ("checkpoint_bytes", "checkpoint (MiB)", 2, 1.0 / 2**20),
    ("latency_ms", "latency (ms)", 2, 1.0),
    ("latency_unmerged_ms", "latency unmerged (ms)", 2, 1.0),
    ("wall_s", "wall (s)", 1, 1.0),
)
_INTEGER_COLUMNS = ("seed", "trainable_params", "checkpoint_bytes")
_TEXT_COLUMNS = ("recipe", "method", "val_metric", "error")


# --------------------------------------------------------------------------- planning and running
@dataclass(frozen=True)
class Run:
    """One run of a comparison.

    Attributes:
        recipe: The recipe's label in the results (its file stem, or the path as given when
            two recipes share a stem).
        path: The recipe file.
        seed: The value of ``--seed_everything``.
    """

    recipe: str
    path: Path
    seed: int

    @property
    def name(self) -> str:
        """A file-name-safe ``<recipe>-seed<seed>``."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.recipe).strip("_") + f"-seed{self.seed}"


def plan_runs(recipes: Sequence[str], seeds: int) -> list[Run]:
    """Resolve the recipes and list the runs: seed 0 of every recipe, then seed 1, and so on.

    Seed-major order gives a first result for every recipe early in a long comparison.

    Args:
        recipes: Recipe files, or names of recipes shipped with the package (as ``fit --config``).
        seeds: Runs per recipe, with seeds ``0 .. seeds - 1``.

    Raises:
        ValueError: If there is no recipe, ``seeds < 1``, or a recipe does not exist or is
            given twice.
    """
    if not recipes:
        raise ValueError("no recipes given; name at least one, e.g. recipes/minilm-sentiment/lora.yaml")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    paths = []
    for recipe in recipes:
        found = Path(find_recipe(recipe)).expanduser()
        if not found.is_file():
            raise ValueError(
                f"recipe not found: {recipe} (no such file, and no recipe of that name ships with lightning-peft)"
            )
        if found.resolve() in paths:
            raise ValueError(f"recipe given twice: {recipe}")
        paths.append(found.resolve())
    stems = [Path(r).stem for r in recipes]
    labels = [stem if stems.count(stem) == 1 else recipe for stem, recipe in zip(stems, recipes)]
    return [Run(label, path, seed) for seed in range(seeds) for label, path in zip(labels, paths)]


def run_command(run: Run, run_dir: Path, overrides: Sequence[str]) -> list[str]:
    """The ``fit`` command of one run: recipe, run folder, the user's overrides, seed, ``Measure``.

    The seed and the callback come after the overrides, so they hold for every run.
    """
    return [
        sys.executable,
        "-m",
        "lightning_peft.cli",
        "fit",
        "--config",
        str(run.path),
        f"--trainer.default_root_dir={run_dir}",
        *overrides,
        f"--seed_everything={run.seed}",
        "--trainer.callbacks+=lightning_peft.compare_measure.Measure",
    ]


_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*)?(Error|Exception|Interrupt)\b.*")


def failure_reason(returncode: int, log: str, limit: int = 200) -> str:
    """A short reason for a failed run from its exit status and output.

    The reason is the last exception line (``ValueError: ...``) or argument error
    (``error: ...``) of the output, with its first detail line, else its last line.
    """
    if returncode < 0:
        try:
            status = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            status = f"killed by signal {-returncode}"
    else:
        status = f"exit code {returncode}"
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    hits = [i for i, line in enumerate(lines) if line.startswith("error:") or _EXCEPTION.match(line)]
    if hits:
        i = hits[-1]
        message = lines[i]
        following = lines[i + 1 : i + 6]
        if message.startswith("error:"):
            detail = next((x.strip() for x in following[:1] if x[:1].isspace()), "")
        else:
            detail = next((x.strip()[2:] for x in following if x.strip().startswith("- ")), "")
        message = f"{message} {detail}".strip() if detail else message
    else:
        message = lines[-1].strip() if lines else "no output"
    reason = f"{status}: {message}"
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def execute(run: Run, out_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Run one ``fit`` subprocess, its output in ``out_dir/logs/<run>.log``; returns its row."""
    run_dir = out_dir / "runs" / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    measurements = run_dir / "measurements.json"
    measurements.unlink(missing_ok=True)
    log_path = out_dir / "logs" / f"{run.name}.log"
    env = {**os.environ, MEASURE_ENV: str(measurements), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(
            run_command(run, run_dir, overrides), stdout=log, stderr=subprocess.STDOUT, env=env, check=False
        )
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(recipe=run.recipe, seed=run.seed, wall_s=time.perf_counter() - start, error="")
    try:
        row.update({k: v for k, v in json.loads(measurements.read_text()).items() if k in COLUMNS})
        found = True
    except (OSError, ValueError):
        found = False
    if done.returncode != 0:
        row["error"] = failure_reason(done.returncode, log_path.read_text(errors="replace"))
    elif not found:
        row["error"] = "no measurements written: training did not finish"
    return row


# --------------------------------------------------------------------------- aggregating and writing
def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that are not ``None``.

    Returns:
        ``(None, None)`` without values, ``(mean, None)`` with one, else ``(mean, std)``.
    """
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None
    if len(present) == 1:
        return present[0], None
    return statistics.fmean(present), statistics.stdev(present)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per recipe (in order of first appearance) over its successful runs.

    Returns:
        Dicts with ``recipe``, ``method``, ``val_metric``, ``trainable_pct``, ``ok`` (successful
        runs), ``runs`` (all runs), ``values`` (each successful run's ``val_value``) and, per
        measured column, ``(mean, std)``.
    """
    summaries = []
    for recipe in dict.fromkeys(row["recipe"] for row in rows):
        mine = [row for row in rows if row["recipe"] == recipe]
        ok = [row for row in mine if not row.get("error")]
        first = ok[0] if ok else mine[0]
        summary: dict[str, Any] = {
            "recipe": recipe,
            "method": first.get("method") or "",
            "val_metric": first.get("val_metric") or "",
            "trainable_pct": mean_std(row.get("trainable_pct") for row in ok)[0],
            "ok": len(ok),
            "runs": len(mine),
            "values": [row["val_value"] for row in ok if row.get("val_value") is not None],
        }
        for column, *_ in _SUMMARY:
            summary[column] = mean_std(row.get(column) for row in ok)
        summaries.append(summary)
    return summaries


def format_mean_std(mean: float | None, std: float | None, decimals: int, scale: float = 1.0) -> str:
    """``"0.9230 ± 0.0040"``; the mean alone without a std; empty without a mean."""
    if mean is None:
        return ""
    text = f"{mean * scale:,.{decimals}f}"
    return text if std is None else f"{text} ± {std * scale:,.{decimals}f}"


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A markdown table with one line per recipe (see :func:`aggregate`)."""
    header = ["recipe", "method", "seeds ok", "trainable %", "val metric"] + [h for _, h, *_ in _SUMMARY]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        pct = "" if s["trainable_pct"] is None else f"{s['trainable_pct']:.4g}"
        cells = [s["recipe"], s["method"], f"{s['ok']}/{s['runs']}", pct, s["val_metric"]]
        cells += [format_mean_std(*s[column], decimals, scale) for column, _, decimals, scale in _SUMMARY]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write ``rows`` to ``path`` with :data:`COLUMNS`, sorted by recipe (first appearance) and seed."""
    order = {recipe: i for i, recipe in enumerate(dict.fromkeys(row["recipe"] for row in rows))}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in sorted(rows, key=lambda r: (order[r["recipe"]], r["seed"])):
            writer.writerow([_csv_value(row.get(column)) for column in COLUMNS])


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Read a ``results.csv`` back into typed rows (``None`` for empty cells)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for column in COLUMNS:
                text = raw.get(column) or ""
                if column in _TEXT_COLUMNS:
                    row[column] = text
                elif not text:
                    row[column] = None
                else:
                    row[column] = int(text) if column in _INTEGER_COLUMNS else float(text)
            rows.append(row)
    return rows


def write_markdown(summaries: Sequence[dict[str, Any]], path: Path, seeds: int) -> None:
    """Write ``results.md``: the table and how to read it."""
    path.write_text(
        "# lightning-peft compare\n\n"
        + markdown_table(summaries)
        + f"\n\nMean ± sample standard deviation over the seeds that succeeded (of {seeds}); a value "
        "without ± comes from one seed. `best value` is the best value of the metric the recipe's "
        "ModelCheckpoint monitors. Column definitions: docs/compare.md.\n"
    )


# --------------------------------------------------------------------------- the command
class _ArgumentParser(argparse.ArgumentParser):
    """Reports argument errors in one line, without the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> _ArgumentParser:
    parser = _ArgumentParser(
        prog="lightning-peft compare",
        description="Run every recipe once per seed, each in its own process, and compare accuracy, "
        "trainable share, memory, step time, checkpoint size and inference latency. Any other "
        "argument is a fit override applied to every run: --trainer.max_steps=100 or "
        "--trainer.max_steps 100 (a value that starts with -- must be joined with =).",
    )
    parser.add_argument(
        "recipes", nargs="*", help="recipe files, or names of recipes shipped with the package"
    )
    parser.add_argument(
        "--out", required=True, help="folder for results.csv, results.md, plots, logs/, runs/"
    )
    parser.add_argument("--seeds", type=int, default=1, help="runs per recipe, seeds 0..N-1 (default: 1)")
    return parser


def split_arguments(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split the arguments after ``compare`` into its own (recipes, ``--out``, ``--seeds``) and fit overrides.

    An unknown ``--flag`` is an override; without ``=`` the next argument is its value unless
    that one starts with ``--``.
    """
    own: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0]
        if flag in ("-h", "--help"):
            own.append(arg)
        elif flag in ("--out", "--seeds"):
            own.append(arg)
            if "=" not in arg and i + 1 < len(args):
                own.append(args[i + 1])
                i += 1
        elif arg.startswith("-"):
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
                overrides.append(args[i + 1])
                i += 1
        else:
            own.append(arg)
        i += 1
    return own, overrides


def compare_main(args: Sequence[str]) -> None:
    """Run ``lightning-peft compare`` (the arguments after ``compare``).

    Raises:
        SystemExit: 2 on an argument error (a one-line message), 1 when every run failed, 130
            when interrupted (after writing the results of the runs that ended).
    """
    parser = _parser()
    own, overrides = split_arguments(args)
    opts = parser.parse_intermixed_args(own)
    try:
        runs = plan_runs(opts.recipes, opts.seeds)
    except ValueError as err:
        parser.error(str(err))
    out = Path(opts.out).expanduser()
    if out.exists() and not out.is_dir():
        parser.error(f"--out: {out.resolve()} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out: cannot create {out}: {err.strerror}")

    rows: list[dict[str, Any]] = []
    bar = tqdm(runs, unit="run", desc="compare", dynamic_ncols=True)
    try:
        for run in bar:
            bar.set_description(f"{run.recipe} seed {run.seed}")
            row = execute(run, out, overrides)
            if row["error"]:
                log = out / "logs" / f"{run.name}.log"
                tqdm.write(
                    f"{run.recipe} seed {run.seed} failed ({row['error']}); log: {log}", file=sys.stderr
                )
            rows.append(row)
            write_csv(rows, out / "results.csv")  # kept current, so an interrupted comparison keeps its rows
    except KeyboardInterrupt:
        bar.close()
        print(
            f"interrupted after {len(rows)} of {len(runs)} runs; writing what was measured", file=sys.stderr
        )
        if not rows:
            raise SystemExit(130) from None
    bar.close()
    summaries = aggregate(rows)
    write_markdown(summaries, out / "results.md", opts.seeds)
    plots = write_plots(rows, summaries, out)
    print(markdown_table(summaries))
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'} and {len(plots)} plots to {out}")
    if len(rows) < len(runs):
        raise SystemExit(130)
    if not any(not row["error"] for row in rows):
        raise SystemExit(1)
