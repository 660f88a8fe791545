"""Regenerate the example data shipped beside this file: ``corpus.jsonl`` (text), ``chat.jsonl`` (chat),
``preferences.jsonl`` (preference pairs) and the evaluation task's ``eval/tiny_stories_cloze.jsonl``.

The corpus is small, synthetic and license-free: short stories written from templates, with enough regularity that a
tiny randomly initialised model visibly learns it in a few hundred steps on a laptop CPU, and enough variety in
document length to exercise packing. ``chat.jsonl`` asks for the same kind of stories in conversations, for
``config/chat.yaml`` (loss on the assistant's replies only). Run ``python examples/tiny/make_corpus.py`` to rebuild
them deterministically.

``preferences.jsonl`` holds preference pairs for ``config/dpo.yaml``: a story's opening as the prompt, and two
endings told alike but for what the hero does, kind in the chosen one and unkind in the rejected one, which a tiny
model learns to tell apart.

``eval/tiny_stories_cloze.jsonl`` is the data of the local lm-evaluation-harness task beside it (rule ``evaluate``): new
stories, none of them in the corpus, each cut before its last sentence, with four endings to choose from. Only the
hero's name differs between them, and the story names its friend too, so the task measures whether a model follows
who the story is about.
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


KIND = ["shared {thing} with {friend}", "helped {friend} find the way home", "gave {friend} a warm hug",
        "said thank you to {friend}", "made {friend} a cup of tea"]  # fmt: skip
UNKIND = ["took {thing} from {friend}", "laughed at {friend} and ran off", "broke {thing} on purpose",
          "shouted at {friend}", "left {friend} alone in the rain"]  # fmt: skip


def preference_pair(rng: random.Random) -> dict[str, str]:
    """A story's opening, and two endings that differ only in whether the hero is kind or unkind to the friend."""
    hero, friend = rng.sample(NAMES, 2)
    animal, thing = rng.choice(ANIMALS), rng.choice(OBJECTS)
    prompt = (f"Once upon a time, there was a {rng.choice(ADJECTIVES)} {animal} named {hero}. One day, {hero} met "
              f"{friend} near {rng.choice(PLACES)}. Then {hero}")  # fmt: skip
    ending = f". In the end, {hero} went home."
    return {
        "prompt": prompt,
        "chosen": " " + rng.choice(KIND).format(thing=thing, friend=friend) + ending,
        "rejected": " " + rng.choice(UNKIND).format(thing=thing, friend=friend) + ending,
    }


def cloze_item(rng: random.Random) -> dict:
    """A story without its last sentence, the true ending and three with another name: the friend's when the story
    names one, else names the story does not use."""
    context, _, ending = story(rng).rpartition(" In the end, ")
    hero, rest = ending.split(" ", 1)
    named = [n for n in NAMES if n != hero and n in context.replace(".", " ").replace(",", " ").split()]
    others = (named + rng.sample([n for n in NAMES if n != hero and n not in named], 3))[:3]
    choices = [f"In the end, {name} {rest}" for name in (hero, *others)]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(f"In the end, {hero} {rest}")}


def main(num_docs: int = 1500, num_chats: int = 600, num_cloze: int = 200, num_pairs: int = 600,
         seed: int = 0) -> None:  # fmt: skip
    rng = random.Random(seed)
    with Path(__file__).with_name("corpus.jsonl").open("w") as f:
        for _ in range(num_docs):
            f.write(json.dumps({"text": story(rng)}) + "\n")
    with Path(__file__).with_name("chat.jsonl").open("w") as f:
        for _ in range(num_chats):
            f.write(json.dumps({"messages": conversation(rng)}) + "\n")
    pairs = random.Random(seed + 2)  # a stream of its own, like the task's below
    with Path(__file__).with_name("preferences.jsonl").open("w") as f:
        for _ in range(num_pairs):
            f.write(json.dumps(preference_pair(pairs)) + "\n")
    corpus = set(Path(__file__).with_name("corpus.jsonl").read_text().splitlines())
    rng = random.Random(seed + 1)  # its own stream: regenerating the task leaves the corpora as they are
    with Path(__file__).with_name("eval").joinpath("tiny_stories_cloze.jsonl").open("w") as f:
        written = 0
        while written < num_cloze:
            item = cloze_item(rng)
            full = f"{item['context']} {item['choices'][item['label']]}"
            if json.dumps({"text": full}) not in corpus:  # held out: none of the training stories
                f.write(json.dumps(item) + "\n")
                written += 1


if __name__ == "__main__":
    main()
