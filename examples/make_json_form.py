"""Write examples/json_form.jsonl: short questions answered in one fixed output form, {"answer": "..."}.

A form the base model does not use by itself, over facts it already knows, so that an aligner has form alone
to learn. France and a few question types are left out on purpose: the README asks about them.
Run: python examples/make_json_form.py
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Ireland": "Dublin", "Poland": "Warsaw",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Peru": "Lima", "Kenya": "Nairobi",
    "Thailand": "Bangkok", "South Korea": "Seoul", "India": "New Delhi", "Turkey": "Ankara", "Cuba": "Havana",
    "Belgium": "Brussels", "Denmark": "Copenhagen", "Hungary": "Budapest", "England": "London", "Chile": "Santiago",
}
OPPOSITES = {
    "hot": "cold", "up": "down", "big": "small", "fast": "slow", "light": "dark", "open": "closed",
    "happy": "sad", "early": "late", "full": "empty", "old": "young", "wet": "dry", "hard": "soft",
    "high": "low", "strong": "weak", "rich": "poor", "left": "right", "day": "night", "win": "lose",
}


def examples() -> list[dict[str, str]]:
    rng = random.Random(0)
    rows = [(f"What is the capital of {country}?", capital) for country, capital in CAPITALS.items()]
    rows += [(f"What is the opposite of {word}?", opposite) for word, opposite in OPPOSITES.items()]
    for _ in range(30):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        rows.append((f"What is {a} plus {b}?", str(a + b)))
    rng.shuffle(rows)
    return [{"prompt": prompt, "response": json.dumps({"answer": answer})} for prompt, answer in rows]


if __name__ == "__main__":
    path = Path(__file__).with_name("json_form.jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in examples()))
    print(f"wrote {path} ({len(examples())} examples)")
