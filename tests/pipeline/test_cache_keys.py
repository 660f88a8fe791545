"""The names of the cache's entries: what changes them, and what does not (so that experiments share entries safely)."""

from __future__ import annotations

import pytest

from vectorlm.config import Config
from vectorlm.pipeline.cache_keys import DataEntries, base_chat_template, base_evaluation_key, reference_logprobs_key

BASE = {"model": "m", "output_dir": "results/a", "max_seq_len": 64, "data": {"train": "web.jsonl"}}


def digests(script: str, *, data=None, model=()) -> dict[str, str]:
    """Stands for the workflow's fingerprints: a digest per file named by its path, the code by its script."""
    return {"code": f"code of {script}", **{f"data {role}": f"digest of {path}" for role, path in (data or {}).items()},
            **{f"model {part}": f"model {part}" for part in model}}  # fmt: skip


def entries(**changes) -> DataEntries:
    raw = {
        **BASE,
        **{k: v for k, v in changes.items() if k != "data"},
        "data": {**BASE["data"], **changes.get("data", {})},
    }
    return DataEntries(Config.from_dict(raw), fingerprint=digests)


def keys(**changes) -> tuple[list[str], str]:
    made = entries(**changes)
    return list(made.keys.values()), made.pack_key


def test_the_tokenize_key_follows_what_tokenize_reads_and_the_pack_key_what_pack_reads():
    tokenized, packed = keys()
    # How a stage runs, where the experiment lives, and what only pack uses: the same tokenized entry.
    for same in ({"output_dir": "results/b"}, {"data": {"tokenize_batch_size": 7}}, {"max_seq_len": 128},
                 {"data": {"packing": False}}, {"data": {"chunk_overlap": 8}}):  # fmt: skip
        assert keys(**same)[0] == tokenized, same
    assert keys(output_dir="results/b") == (tokenized, packed)
    assert keys(data={"tokenize_batch_size": 7}) == (tokenized, packed)
    for repacked in ({"max_seq_len": 128}, {"data": {"packing": False}}, {"data": {"chunk_overlap": 8}}):
        assert keys(**repacked)[1] != packed, repacked
    # What tokenize reads: its settings, the files (by content) and trust_remote_code.
    for retokenized in ({"data": {"text_field": "body"}}, {"data": {"eval_fraction": 0.1}}, {"trust_remote_code": True},
                        {"data": {"train": "books.jsonl"}}, {"data": {"split_seed": 1}}):  # fmt: skip
        changed = keys(**retokenized)
        assert changed[0] != tokenized and changed[1] != packed, retokenized


def test_a_source_keeps_its_entry_wherever_it_stands_in_a_mixture_and_weights_only_repack():
    web, books = {"path": "web.jsonl"}, {"path": "books.jsonl", "text_field": "body"}
    first = entries(data={"train": [web, books]})
    swapped = entries(data={"train": [books, web]})
    assert first.keys == swapped.keys  # by source name: web and books
    assert first.pack_key != swapped.pack_key  # the order of the sources is the order of the packed documents
    weighted = entries(data={"train": [web, {**books, "weight": 3}]})
    assert weighted.keys == first.keys and weighted.pack_key != first.pack_key
    assert first.tokenize_settings("books")["data"]["text_field"] == "body"
    assert set(first.tokenize_settings("web")["data"]) == {
        "train",
        "eval",
        "eval_fraction",
        "split",
        "text_field",
        "prompt_field",
        "response_field",
        "messages_field",
        "chat_template",
        "separator",
        "chosen_field",
        "rejected_field",
        "split_seed",
    }  # fmt: skip: the data keys whose x-reruns is tokenize


def test_the_eval_file_goes_with_the_first_source_only():
    made = entries(data={"train": [{"path": "web.jsonl"}, {"path": "books.jsonl"}], "eval": "held_out.jsonl"})
    assert made.files("web") == {"train": "web.jsonl", "eval": "held_out.jsonl"}
    assert made.files("books") == {"train": "books.jsonl"}
    assert made.tokenize_settings("books")["data"]["eval"] is None and not made.tokenize_settings("web")["hold_out"]


def test_two_sources_that_make_the_same_entry_share_one_job():
    made = entries(data={"train": [{"path": "web.jsonl", "name": "a"}, {"path": "web.jsonl", "name": "b"}]})
    assert made.keys["a"] == made.keys["b"] and made.source_of == {made.keys["a"]: "a"}


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({"evaluate": {"prompts": ["x"], "batch_size": 32}}, True),  # how it runs
        ({"output_dir": "results/b"}, True),  # another experiment on the same base model
        ({"train": {"lr": 0.1}}, True),  # training does not touch the base model
        ({"evaluate": {"prompts": ["x"], "limit": 3}}, False),
        ({"evaluate": {"prompts": ["x"], "apply_chat_template": True}}, False),
    ],
)
def test_the_base_evaluation_is_shared_by_experiments_on_one_base_model(change, same):
    def key(**raw):
        config = Config.from_dict({**BASE, "evaluate": {"prompts": ["x"]}, **raw})
        return base_evaluation_key(config, model_digests={"files": "f"}, evaluate_digests={"code": "c"},
                                   versions={"lm_eval": "0.4"})  # fmt: skip

    assert (key(**change) == key()) is same


def test_the_base_model_is_prompted_with_the_training_chat_template_only_when_asked():
    chat = {**BASE, "data": {"train": "c.jsonl", "messages_field": "m", "chat_template": "T"}}
    assert base_chat_template(Config.from_dict({**chat, "evaluate": {"prompts": ["x"]}})) is None
    asked = Config.from_dict({**chat, "evaluate": {"prompts": ["x"], "apply_chat_template": True}})
    assert base_chat_template(asked) == "T"


def test_the_keys_of_the_embedded_example_do_not_change_unnoticed():
    """A change in how keys are composed (or a new data setting that reruns tokenize) makes every experiment of every
    user tokenize anew: make it on purpose, and change these values with it. (These are also what rules/common.smk
    composed before vectorlm/pipeline/ existed, for the same digests.)"""
    made = entries()
    assert (made.keys, made.pack_key) == ({"web": "abdc2bb447c4c8e5"}, "786e28d16f17ccb2")


def test_the_reference_key_follows_the_packed_rows_the_reference_model_precision_and_code_not_the_policy():
    base = {"pack_key": "p", "reference_digests": {"files": "f", "weights": "w"}, "mixed_precision": True,
            "digests": {"code": "c"}}  # fmt: skip
    key = reference_logprobs_key(**base)
    for change in ({"pack_key": "p2"}, {"reference_digests": {"files": "f", "weights": "w2"}},
                   {"mixed_precision": False}, {"digests": {"code": "c2"}}):  # fmt: skip
        assert reference_logprobs_key(**{**base, **change}) != key, change
    # What only the policy's training uses (dpo.beta, the learning rate, LoRA) is in none of its inputs: DPO
    # experiments that differ in them share the entry.
    dpo = {"train": {"objective": "dpo"}, "data": {"chosen_field": "chosen", "rejected_field": "rejected"}}

    def reference_key(**changes) -> str:  # as rules/common.smk composes it
        made = entries(**{**dpo, **changes})
        return reference_logprobs_key(pack_key=made.pack_key, reference_digests=base["reference_digests"],
                                      mixed_precision=made.config.train.mixed_precision, digests=base["digests"])  # fmt: skip

    assert reference_key() == reference_key(dpo={"beta": 0.5}, lora={"enabled": True})
    assert reference_key() != reference_key(data={**dpo["data"], "split_seed": 7})  # other packed rows
