"""Serve mixed batches from trained multitask checkpoints; print each task's accuracy.

Every validation review is classified once per task, always inside a batch whose rows
alternate between the tasks (row *i* through task ``tasks[(i + shift) % T]``'s adapter and
head, one encoder forward per batch, :meth:`MultiTaskClassifier.classify`). The same rows
are also classified one task at a time (``module(task, **batch)``), and the two answers
are compared row by row: routing per row must not change any prediction.

Usage (the checkpoint paths ``fit`` printed)::

    python recipes/minilm-multitask/serve_mixed.py runs/.../both-best.ckpt [more.ckpt ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lightning_peft import MultiTaskClassifier, MultiTaskData

HERE = Path(__file__).resolve().parent
FIELDS = {
    "sentiment": "label",
    "domain": "domain",
}  # each task's field in the review rows (--field adds more)


def evaluate(
    ckpt: str, val_file: str, batch_size: int, fields: dict[str, str]
) -> dict[str, dict[str, float]]:
    """Per task: accuracy through mixed batches, through single-task batches, and their agreement."""
    module = MultiTaskClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    tasks = list(module.tasks)
    unknown = [t for t in tasks if t not in fields]
    if unknown:
        raise SystemExit(
            f"{ckpt}: no row field known for task(s) {unknown}; pass --field TASK=FIELD for each"
        )
    specs = {t: {"label_field": fields[t], "label_names": module.label_names.get(t)} for t in tasks}
    data = MultiTaskData(module.hparams.model, specs, val_file, val_file, max_length=64)
    rows = data.split("val")
    count = len(rows[tasks[0]])
    mixed = {t: [] for t in tasks}
    single = {t: [] for t in tasks}
    labels = {t: [] for t in tasks}
    seconds = 0.0
    for shift in range(len(tasks)):
        for start in range(0, count, batch_size):
            index = range(start, min(start + batch_size, count))
            route = [tasks[(i + shift) % len(tasks)] for i in index]
            batch = data.collate([rows[task][i] for i, task in zip(index, route)])
            batch.pop("labels", None)
            began = time.perf_counter()
            answers = module.classify(batch, route)
            seconds += time.perf_counter() - began
            with torch.no_grad():
                alone = {t: module(t, **batch).argmax(-1) for t in set(route)}
            for row, (i, task) in enumerate(zip(index, route)):
                mixed[task].append(answers[row][1])
                single[task].append(int(alone[task][row]))
                labels[task].append(rows[task][i]["labels"])
    batches = len(tasks) * -(-count // batch_size)
    report = {}
    for task in tasks:
        n = len(labels[task])
        report[task] = {
            "rows": n,
            "mixed_acc": sum(p == y for p, y in zip(mixed[task], labels[task])) / n,
            "single_acc": sum(p == y for p, y in zip(single[task], labels[task])) / n,
            "agreement": sum(a == b for a, b in zip(mixed[task], single[task])) / n,
            "ms_per_mixed_batch": 1000 * seconds / batches,
        }
    return report


def main() -> None:
    """Parse the checkpoints and print one line per checkpoint and task."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpts", nargs="+", help="MultiTaskClassifier checkpoints (.ckpt)")
    parser.add_argument("--val_file", default=str(HERE / "../minilm-sentiment/data/val.jsonl"))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--field",
        action="append",
        default=[],
        metavar="TASK=FIELD",
        help="the row field holding a task's label (default: sentiment=label, domain=domain)",
    )
    args = parser.parse_args()
    missing = [c for c in args.ckpts if not Path(c).is_file()]
    if missing:
        parser.error(f"no such checkpoint: {', '.join(missing)}")
    fields = dict(FIELDS)
    for item in args.field:
        task, sep, field = item.partition("=")
        if not sep or not task or not field:
            parser.error(f"--field takes TASK=FIELD, got {item!r}")
        fields[task] = field
    print(
        "checkpoint | task | rows | accuracy (mixed batches) | accuracy (one task per batch) | same answer | ms per mixed batch"
    )
    for ckpt in args.ckpts:
        for task, r in evaluate(ckpt, args.val_file, args.batch_size, fields).items():
            print(
                f"{ckpt} | {task} | {r['rows']} | {r['mixed_acc']:.4f} | {r['single_acc']:.4f} | "
                f"{r['agreement']:.4f} | {r['ms_per_mixed_batch']:.1f}"
            )


if __name__ == "__main__":
    main()
