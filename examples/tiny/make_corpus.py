"""Regenerate the example corpus shipped beside this file (``corpus.jsonl``).

The corpus is small, synthetic and license-free: short stories written from templates, with enough regularity that a
tiny randomly initialised model visibly learns it in a few hundred steps on a laptop CPU, and enough variety in
document length to exercise packing. Run ``python examples/tiny/make_corpus.py`` to rebuild it deterministically.
"""

import json
import random
from pathlib import Path

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lena", "Milo", "Nia"]
ANIMALS = ["cat", "dog", "fox", "owl", "rabbit", "bear", "duck", "mouse", "frog", "horse"]
ADJECTIVES = ["small", "brave", "quiet", "curious", "happy", "sleepy", "clever", "kind", "busy", "gentle"]
PLACES = ["a little house by the river", "a big forest", "a busy town", "a farm near the hills", "a quiet village"]
OBJECTS = ["a red ball", "a blue kite", "an old map", "a shiny key", "a wooden boat", "a green hat", "a tiny bell"]
ACTIVITIES = ["play in the garden", "read books", "sing songs", "bake bread", "draw pictures", "climb trees"]
FEELINGS = ["happy", "proud", "surprised", "tired", "excited", "calm"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]


def story(rng: random.Random) -> str:
    hero, friend = rng.sample(NAMES, 2)
    animal, adjective, place = rng.choice(ANIMALS), rng.choice(ADJECTIVES), rng.choice(PLACES)
    thing, activity = rng.choice(OBJECTS), rng.choice(ACTIVITIES)
    sentences = [
        f"Once upon a time, there was a {adjective} {animal} named {hero}.",
        f"{hero} lived in {place}.",
        f"Every day, {hero} liked to {activity}.",
    ]
    middle = [
        f"One {rng.choice(WEATHER)} morning, {hero} found {thing}.",
        f"{hero} showed {thing} to a friend named {friend}.",
        f"{friend} said, \"Let us {rng.choice(ACTIVITIES)} together!\"",
        f"They walked to {rng.choice(PLACES)} and looked around.",
        f"It was {rng.choice(WEATHER)}, so {hero} and {friend} stayed close.",
        f"{friend} was {rng.choice(FEELINGS)} and {hero} was {rng.choice(FEELINGS)}.",
        f"They counted {rng.randint(2, 9)} birds in the sky.",
        f"Then {hero} lost {thing}, and they looked for it everywhere.",
        f"At last, {friend} found {thing} under a tree.",
    ]
    sentences += [middle[i] for i in sorted(rng.sample(range(len(middle)), rng.randint(1, len(middle))))]
    sentences.append(f"In the end, {hero} felt {rng.choice(FEELINGS)}, and they were good friends forever.")
    return " ".join(sentences)


def main(num_docs: int = 1500, seed: int = 0) -> None:
    rng = random.Random(seed)
    path = Path(__file__).with_name("corpus.jsonl")
    with path.open("w") as f:
        for _ in range(num_docs):
            f.write(json.dumps({"text": story(rng)}) + "\n")


if __name__ == "__main__":
    main()
