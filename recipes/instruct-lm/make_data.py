"""Write the small instruction-tuning set in ``data/`` (deterministic; rerun to regenerate).

Eight templated task families with exactly checkable answers (arithmetic, sorting, counting,
reversing, opposites, capitals, next/previous number, plurals), so a run's validation loss
means something even with a tiny model. Lower-case only: the bundled tokenizer is uncased.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "light": "dark",
    "happy": "sad",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "old": "new",
    "strong": "weak",
    "wet": "dry",
    "high": "low",
    "loud": "quiet",
    "rich": "poor",
    "hard": "soft",
    "long": "short",
    "first": "last",
    "inside": "outside",
    "push": "pull",
    "win": "lose",
    "buy": "sell",
    "day": "night",
    "left": "right",
}
CAPITALS = {
    "france": "paris",
    "germany": "berlin",
    "italy": "rome",
    "spain": "madrid",
    "japan": "tokyo",
    "canada": "ottawa",
    "egypt": "cairo",
    "kenya": "nairobi",
    "peru": "lima",
    "norway": "oslo",
    "greece": "athens",
    "poland": "warsaw",
    "india": "new delhi",
    "china": "beijing",
    "chile": "santiago",
    "cuba": "havana",
    "ireland": "dublin",
    "austria": "vienna",
    "portugal": "lisbon",
    "sweden": "stockholm",
}
PLURALS = {
    "cat": "cats",
    "dog": "dogs",
    "box": "boxes",
    "city": "cities",
    "child": "children",
    "mouse": "mice",
    "foot": "feet",
    "tooth": "teeth",
    "leaf": "leaves",
    "bus": "buses",
    "baby": "babies",
    "man": "men",
    "woman": "women",
    "knife": "knives",
    "glass": "glasses",
    "story": "stories",
    "fox": "foxes",
    "sheep": "sheep",
    "fish": "fish",
    "goose": "geese",
}
WORDS = [
    "red",
    "blue",
    "green",
    "apple",
    "river",
    "stone",
    "cloud",
    "music",
    "paper",
    "tiger",
    "bread",
    "lamp",
]


def example(rng: random.Random) -> dict[str, str]:
    """One random row ``{"prompt": ..., "response": ...}`` from one of the task families."""
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return {"prompt": f"what is {a} plus {b}?", "response": str(a + b)}
    if kind == 1:
        nums = rng.sample(range(100), rng.randint(3, 6))
        return {
            "prompt": "sort these numbers: " + " ".join(map(str, nums)),
            "response": " ".join(map(str, sorted(nums))),
        }
    if kind == 2:
        words = rng.sample(WORDS, rng.randint(2, 7))
        return {"prompt": "how many words are in: " + " ".join(words), "response": str(len(words))}
    if kind == 3:
        words = rng.sample(WORDS, rng.randint(2, 5))
        return {
            "prompt": "reverse the order of the words: " + " ".join(words),
            "response": " ".join(words[::-1]),
        }
    if kind == 4:
        word, opposite = rng.choice(sorted(OPPOSITES.items()))
        if rng.random() < 0.5:
            word, opposite = opposite, word
        return {"prompt": f"give the opposite of {word}.", "response": opposite}
    if kind == 5:
        country, capital = rng.choice(sorted(CAPITALS.items()))
        return {"prompt": f"what is the capital of {country}?", "response": capital}
    if kind == 6:
        n = rng.randint(0, 998)
        if rng.random() < 0.5:
            return {"prompt": f"what number comes after {n}?", "response": str(n + 1)}
        return {"prompt": f"what number comes before {n + 1}?", "response": str(n)}
    word, plural = rng.choice(sorted(PLURALS.items()))
    return {"prompt": f"what is the plural of {word}?", "response": plural}


def main() -> None:
    """Write 500 training and 100 validation rows, all prompts distinct."""
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < 600:
        row = example(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    for name, part in (("train.jsonl", rows[:500]), ("val.jsonl", rows[500:])):
        with open(out / name, "w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
