"""Regenerate the example corpora shipped beside this file: ``corpus.jsonl`` (text) and ``chat.jsonl`` (chat).

The corpus is small, synthetic and license-free: short stories written from templates, with enough regularity that a
tiny randomly initialised model visibly learns it in a few hundred steps on a laptop CPU, and enough variety in
document length to exercise packing. ``chat.jsonl`` asks for the same kind of stories in conversations, for
``config/chat.yaml`` (loss on the assistant's replies only). Run ``python examples/tiny/make_corpus.py`` to rebuild
both deterministically.
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


def story(rng: random.Random, *, hero: str | None = None, animal: str | None = None) -> str:
    hero, friend = (hero, rng.choice([n for n in NAMES if n != hero])) if hero else rng.sample(NAMES, 2)
    animal, adjective, place = animal or rng.choice(ANIMALS), rng.choice(ADJECTIVES), rng.choice(PLACES)
    thing, activity = rng.choice(OBJECTS), rng.choice(ACTIVITIES)
    sentences = [
        f"Once upon a time, there was a {adjective} {animal} named {hero}.",
        f"{hero} lived in {place}.",
        f"Every day, {hero} liked to {activity}.",
    ]
    middle = [
        f"One {rng.choice(WEATHER)} morning, {hero} found {thing}.",
        f"{hero} showed {thing} to a friend named {friend}.",
        f'{friend} said, "Let us {rng.choice(ACTIVITIES)} together!"',
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


def conversation(rng: random.Random) -> list[dict[str, str]]:
    hero, animal = rng.choice(NAMES), rng.choice(ANIMALS)
    turns = [
        {"role": "system", "content": "You tell short stories for children."},
        {"role": "user", "content": f"Tell me a story about a {animal} named {hero}."},
        {"role": "assistant", "content": story(rng, hero=hero, animal=animal)},
    ]
    if rng.random() < 0.5:
        turns += [
            {"role": "user", "content": f"How did {hero} feel at the end?"},
            {"role": "assistant", "content": f"{hero} felt {rng.choice(FEELINGS)}."},
        ]
    return turns


def main(num_docs: int = 1500, num_chats: int = 600, seed: int = 0) -> None:
    rng = random.Random(seed)
    with Path(__file__).with_name("corpus.jsonl").open("w") as f:
        for _ in range(num_docs):
            f.write(json.dumps({"text": story(rng)}) + "\n")
    with Path(__file__).with_name("chat.jsonl").open("w") as f:
        for _ in range(num_chats):
            f.write(json.dumps({"messages": conversation(rng)}) + "\n")


if __name__ == "__main__":
    main()
