"""Write demo.jsonl: short, regular prompt/completion tasks that builtin:tiny learns on a CPU.

Run from anywhere: ``python resources/demo/make_demo.py``. Standard library only and a fixed
seed, so the output is the same byte for byte on every machine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
PER_TASK = 400

WORDS = (
    "cat",
    "dog",
    "sun",
    "moon",
    "tree",
    "bird",
    "fish",
    "star",
    "rain",
    "snow",
    "wind",
    "fire",
    "lake",
    "road",
    "book",
    "door",
    "hand",
    "ship",
    "rock",
    "leaf",
    "milk",
    "salt",
    "gold",
    "iron",
    "corn",
    "rice",
    "bear",
    "wolf",
    "frog",
    "duck",
    "lamp",
    "desk",
    "cake",
    "song",
    "king",
    "home",
    "farm",
    "town",
    "ring",
    "coat",
    "shoe",
    "bell",
    "ball",
    "kite",
    "nest",
    "hill",
    "sand",
    "seed",
    "wave",
    "rose",
    "mint",
    "plum",
    "pear",
    "lime",
    "apple",
    "river",
    "cloud",
    "stone",
    "light",
    "green",
    "happy",
    "music",
    "water",
    "bread",
    "chair",
    "table",
)

CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Canada": "Ottawa",
    "Cuba": "Havana",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Portugal": "Lisbon",
    "Russia": "Moscow",
    "China": "Beijing",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Belgium": "Brussels",
    "Hungary": "Budapest",
    "Thailand": "Bangkok",
}

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "old": "new",
    "day": "night",
    "open": "closed",
    "left": "right",
    "wet": "dry",
    "full": "empty",
    "hard": "soft",
    "light": "dark",
    "early": "late",
    "happy": "sad",
    "high": "low",
    "near": "far",
    "rich": "poor",
    "thick": "thin",
    "loud": "quiet",
    "strong": "weak",
    "win": "lose",
    "yes": "no",
    "in": "out",
    "first": "last",
}


def examples(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(PER_TASK):
        w = rng.choice(WORDS)
        rows.append({"prompt": f"Upper: {w}\n", "completion": w.upper()})
        w = rng.choice([x for x in WORDS if len(x) <= 5])
        rows.append({"prompt": f"Reverse: {w}\n", "completion": w[::-1]})
        a, b = rng.randrange(50), rng.randrange(50)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
        country = rng.choice(sorted(CAPITALS))
        rows.append({"prompt": f"Capital of {country}?\n", "completion": CAPITALS[country]})
        word = rng.choice(sorted(OPPOSITES))
        rows.append({"prompt": f"Opposite of {word}?\n", "completion": OPPOSITES[word]})
    return rows


def main() -> None:
    rows = examples(random.Random(SEED))
    out = Path(__file__).resolve().parent / "demo.jsonl"
    with out.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
