"""Tokenizing preference rows: two documents per pair, the loss on each completion only; bad rows skipped or named."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.data.test_tokenize import CHATML, tokenize
from vectorlm.config import DataConfig
from vectorlm.data.sources import DataError

PAIRS = {"prompt_field": "prompt", "chosen_field": "chosen", "rejected_field": "rejected"}


def completion(row, tokenizer):
    """The tokens a document trains on (its loss mask), decoded."""
    ids = np.asarray(row["input_ids"])[np.asarray(row["loss_mask"], dtype=bool)]
    return tokenizer.decode(ids)


def test_string_pairs_become_chosen_then_rejected_with_loss_on_the_completions(tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": f"The fox number {i} said", "chosen": " yes, kindly.", "rejected": " no!"} for i in range(20)]
    stats, tokenized = tokenize(tmp_path, tiny_model_dir, rows, eval_fraction=0.1, **PAIRS)
    assert stats["mode"] == "preference"
    assert (stats["train"]["pairs"], stats["eval"]["pairs"]) == (18, 2)
    assert len(tokenized["train"]) == 36 and len(tokenized["eval"]) == 4  # a pair's documents stay in one split
    chosen, rejected = tokenized["train"][0], tokenized["train"][1]
    prompt = [tokenizer.bos_token_id, *tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"]]
    assert chosen["input_ids"][: len(prompt)] == rejected["input_ids"][: len(prompt)]
    assert completion(chosen, tokenizer).replace(" ", "") == "yes,kindly." + tokenizer.eos_token
    assert completion(rejected, tokenizer).replace(" ", "") == "no!" + tokenizer.eos_token
    assert not any(chosen["loss_mask"][: len(prompt)])


def test_conversational_pairs_train_only_the_last_assistant_turn(tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shared = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Which animal?"},
              {"role": "user", "content": "A fox."}]  # fmt: skip
    rows = [
        {"chosen": shared + [{"role": "assistant", "content": f"The fox {i} was kind."}],
         "rejected": shared + [{"role": "assistant", "content": "No."}]}
        for i in range(10)
    ]  # fmt: skip
    data = {"chosen_field": "chosen", "rejected_field": "rejected", "chat_template": CHATML}
    stats, tokenized = tokenize(tmp_path, tiny_model_dir, rows, eval_fraction=0.2, **data)
    assert stats["train"]["pairs"] == 8
    chosen, rejected = tokenized["train"][0], tokenized["train"][1]
    assert "Which animal" not in completion(chosen, tokenizer)  # the earlier assistant turn is prompt
    assert completion(chosen, tokenizer).startswith("The fox") and completion(rejected, tokenizer).startswith("No.")
    # an explicit prompt of messages with one-turn completions is the same pair
    explicit = [{"prompt": shared, "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in rows]
    _, again = tokenize(tmp_path / "explicit", tiny_model_dir, explicit, eval_fraction=0.2, prompt_field="prompt",
                        **data)  # fmt: skip
    assert again["train"]["input_ids"] == tokenized["train"]["input_ids"]
    # a prompt field beside sides that hold their own prompt turns (UltraFeedback) is not put in a second time
    both = [{"prompt": "Tell me a story.", **r} for r in rows]
    _, same = tokenize(tmp_path / "both", tiny_model_dir, both, eval_fraction=0.2, prompt_field="prompt", **data)
    assert same["train"]["input_ids"] == tokenized["train"]["input_ids"]


def test_pairs_with_nothing_to_prefer_are_counted_skips(tmp_path, tiny_model_dir):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}] * 6 + [
        {"prompt": "p", "chosen": None, "rejected": "bad"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "good", "rejected": ""},
    ]
    stats, _ = tokenize(tmp_path, tiny_model_dir, rows, eval_fraction=0.2, **PAIRS)
    skips = {k: v for k, v in stats["train"].items() if k.startswith("skipped")}
    assert skips == {"skipped: chosen or rejected null or empty": 2, "skipped: chosen and rejected identical": 1}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "both be strings or both be lists"),
        ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
         "must end with the assistant's turn"),
        ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
          "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "must share every turn"),
    ],
)  # fmt: skip
def test_malformed_pairs_name_the_row(tmp_path, tiny_model_dir, row, message):
    rows = [{"chosen": "good", "rejected": "bad"}] * 3 + [row]
    with pytest.raises(DataError, match=rf"row 4: .*{message}"):
        tokenize(tmp_path, tiny_model_dir, rows, chosen_field="chosen", rejected_field="rejected", chat_template=CHATML)


def test_pair_settings_go_together():
    with pytest.raises(ValueError, match="chosen_field and data.rejected_field go together"):
        DataConfig(train="x.jsonl", chosen_field="chosen")
    with pytest.raises(ValueError, match="one kind of instruction data"):
        DataConfig(train="x.jsonl", chosen_field="c", rejected_field="r", messages_field="m")
