import json

import datasets
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.conftest import write_jsonl
from vectorlm.config import ConfigError, DataConfig
from vectorlm.data.sources import DataError
from vectorlm.data.tokenize import document_boundaries, load_tokenizer, run_tokenize

CHATML = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def gpt2_style_tokenizer(texts) -> PreTrainedTokenizerFast:
    """BOS == EOS == <|endoftext|> and no pad token, like GPT-2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tokenize(tmp_path, model_dir, rows, **data) -> tuple[dict, datasets.DatasetDict]:
    tmp_path.mkdir(exist_ok=True)
    path = rows if not isinstance(rows, list) else write_jsonl(tmp_path / "train.jsonl", rows)
    stats = run_tokenize(model_dir=model_dir, data=DataConfig(train=str(path), **data), output_dir=tmp_path / "tok")
    return stats, datasets.load_from_disk(str(tmp_path / "tok"))


def all_rows(tokenized):
    return [row for split in ("train", "eval") for row in tokenized[split]]


def test_llama_style_documents_get_bos_and_eos(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token is None
    prefix, suffix = document_boundaries(tokenizer)
    assert prefix == [tokenizer.bos_token_id] and suffix == [tokenizer.eos_token_id]


def test_gpt2_style_documents_get_one_separator(corpus_rows):
    tokenizer = gpt2_style_tokenizer(r["text"] for r in corpus_rows[:200])
    assert tokenizer.bos_token_id == tokenizer.eos_token_id and tokenizer.pad_token is None
    assert document_boundaries(tokenizer) == ([], [tokenizer.eos_token_id])


def test_text_documents_match_the_tokenizer_and_split(tmp_path, tiny_model_dir, corpus_rows):
    rows = corpus_rows[:100]
    stats, tokenized = tokenize(tmp_path, tiny_model_dir, rows, eval_fraction=0.1)
    assert len(tokenized["train"]) == 90 and len(tokenized["eval"]) == 10
    assert tokenized["train"].column_names == ["input_ids"]  # text: every token is trained on
    assert stats["train"]["tokens"] == stats["train"]["loss_tokens"] == sum(map(len, tokenized["train"]["input_ids"]))
    assert json.loads((tmp_path / "tok" / "stats.json").read_text())["eval"] == stats["eval"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = {tuple([tokenizer.bos_token_id] + tokenizer(r["text"], add_special_tokens=False)["input_ids"]
                      + [tokenizer.eos_token_id]) for r in rows}  # fmt: skip
    assert {tuple(r["input_ids"]) for r in all_rows(tokenized)} == expected


def test_split_is_reproducible_and_seeded(tmp_path, tiny_model_dir, corpus_rows):
    _, a = tokenize(tmp_path / "a", tiny_model_dir, corpus_rows[:50], split_seed=1)
    _, b = tokenize(tmp_path / "b", tiny_model_dir, corpus_rows[:50], split_seed=1)
    _, c = tokenize(tmp_path / "c", tiny_model_dir, corpus_rows[:50], split_seed=2)
    assert a["eval"]["input_ids"] == b["eval"]["input_ids"] != c["eval"]["input_ids"]


def test_prompt_response_loss_on_the_response_only(tmp_path, tiny_model_dir):
    rows = [{"q": "Who is Ada?", "a": "Ada is a fox."}, {"q": "Where?", "a": "In a big forest."}] * 5
    stats, tokenized = tokenize(tmp_path, tiny_model_dir, rows, prompt_field="q", response_field="a")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = next(r for r in all_rows(tokenized) if tokenizer.decode(r["input_ids"]).startswith("<s>Who"))
    ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"], dtype=bool)
    assert tokenizer.decode(ids[mask]) == "Ada is a fox.</s>"
    assert tokenizer.decode(ids[~mask]) == "<s>Who is Ada?"
    assert stats["train"]["loss_tokens"] < stats["train"]["tokens"]


def test_messages_loss_on_assistant_turns_only(tmp_path, tiny_model_dir):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a fox."},
        {"role": "assistant", "content": "Ada."},
        {"role": "user", "content": "And a bear?"},
        {"role": "assistant", "content": "Ben."},
    ]
    rows = [{"messages": conversation}] * 4 + [{"messages": conversation[:2]}]  # the last has no assistant turn
    stats, tokenized = tokenize(tmp_path, tiny_model_dir, rows, messages_field="messages", chat_template=CHATML)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = all_rows(tokenized)[0]
    ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"], dtype=bool)
    assert tokenizer.decode(ids).startswith("<s>system\nBe brief.</s>")
    trained = tokenizer.decode(ids[mask])
    assert trained == "Ada.</s>\nBen.</s>\n", trained
    assert stats["train"]["skipped: no assistant turn"] + stats["eval"].get("skipped: no assistant turn", 0) == 1


def test_messages_need_a_chat_template(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 2
    with pytest.raises(DataError, match="the tokenizer has no chat template; give one in data.chat_template"):
        tokenize(tmp_path, tiny_model_dir, rows, messages_field="messages")


def test_unknown_role_names_the_row(tmp_path, tiny_model_dir):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    with pytest.raises(DataError, match=r"train\.jsonl: row 3: message 2 has unknown role 'bot' \(expected system"):
        tokenize(tmp_path, tiny_model_dir, [good, good, bad, good], messages_field="messages", chat_template=CHATML)


def test_separator_masks_everything_up_to_it(tmp_path, tiny_model_dir):
    rows = [{"text": "Question: who? ### Answer: Ada."}] * 3 + [{"text": "no separator here"}]
    stats, tokenized = tokenize(tmp_path, tiny_model_dir, rows, separator=" ### Answer:")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = all_rows(tokenized)[0]
    ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"], dtype=bool)
    assert tokenizer.decode(ids[mask]) == " Ada.</s>"
    assert sum(s.get("skipped: no separator", 0) for s in (stats["train"], stats["eval"])) == 1


def test_null_and_empty_texts_are_skipped_and_counted(tmp_path, tiny_model_dir):
    rows = [{"text": "one"}, {"text": None}, {"text": ""}, {"text": "two"}, {"text": "three"}] * 4
    stats, tokenized = tokenize(tmp_path, tiny_model_dir, rows, eval_fraction=0.25)
    assert len(all_rows(tokenized)) == 12
    assert stats["train"]["skipped: text null or empty"] == 8  # counted where they were read


def test_non_string_text_names_the_row(tmp_path, tiny_model_dir):
    rows = [{"text": "a"}, {"text": "b"}, {"text": "c"}, {"text": {"nested": 1}}]
    with pytest.raises(DataError, match=r"train\.jsonl: row 4: field 'text' is \{'nested': 1\} \(dict\), not a string"):
        tokenize(tmp_path, tiny_model_dir, rows)


def test_nothing_to_train_on_is_an_error(tmp_path, tiny_model_dir):
    rows = [{"q": "a", "a": None}, {"q": "b", "a": ""}, {"q": "c", "a": None}]
    with pytest.raises(DataError, match=r"no train rows left after skipping: 3 rows a null or empty"):
        tokenize(tmp_path, tiny_model_dir, rows, prompt_field="q", response_field="a")


def test_explicit_eval_file_and_other_formats(tmp_path, tiny_model_dir, corpus_rows):
    train = tmp_path / "train.parquet"
    datasets.Dataset.from_list(corpus_rows[:20]).to_parquet(str(train))
    docs = tmp_path / "eval_docs"
    docs.mkdir()
    for i, row in enumerate(corpus_rows[20:23]):
        (docs / f"{i}.txt").write_text(row["text"])
    stats, _ = tokenize(tmp_path, tiny_model_dir, train, eval=str(docs))
    assert stats["train"]["documents"] == 20 and stats["eval"]["documents"] == 3


def test_missing_text_field_names_file_and_fields(tmp_path, tiny_model_dir):
    with pytest.raises(
        DataError, match=r"t\.jsonl: rows have no field 'text' \(config key data\.text_field\); fields found: body"
    ):
        tokenize(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "t.jsonl", [{"body": "a"}, {"body": "b"}]))
    assert not (tmp_path / "tok").exists()


def test_single_document_cannot_be_split(tmp_path, tiny_model_dir):
    with pytest.raises(DataError, match=r"data\.train has 1 document; holding out an eval split"):
        tokenize(tmp_path, tiny_model_dir, [{"text": "alone"}])


def counts(stats, key):
    return stats["train"].get(key, 0) + stats["eval"].get(key, 0)


USER_ONLY = {"messages": [{"role": "user", "content": "Anyone there?"}]}
CHAT = {"messages": [{"role": "user", "content": "Name a fox."}, {"role": "assistant", "content": "Ada."}]}


@pytest.mark.parametrize(
    ("rows", "data", "reason"),
    [
        ([USER_ONLY] * 4 + [CHAT] * 6, {"messages_field": "messages", "chat_template": CHATML}, "no assistant turn"),
        ([{"text": None}] * 4 + [{"text": "Q? ### A."}] * 6, {"separator": " ###"}, "text null or empty"),
        ([{"text": "no mark"}] * 4 + [{"text": "Q? ### A."}] * 6, {"separator": " ###"}, "no separator"),
    ],
    ids=["chat", "separator-null", "separator-missing"],
)
def test_a_batch_whose_every_row_is_skipped_is_counted(tmp_path, tiny_model_dir, rows, data, reason):
    stats, tokenized = tokenize(tmp_path, tiny_model_dir, rows, tokenize_batch_size=2, **data)
    assert counts(stats, f"skipped: {reason}") == 4 and len(all_rows(tokenized)) == 6


def test_an_assistant_turn_that_opens_the_conversation_is_context(tmp_path, tiny_model_dir):
    opening = {"role": "assistant", "content": "Hello, I am a guide."}
    rows = [{"messages": [opening, *CHAT["messages"]]}] * 3 + [{"messages": [opening]}]
    stats, tokenized = tokenize(tmp_path, tiny_model_dir, rows, messages_field="messages", chat_template=CHATML)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = all_rows(tokenized)[0]
    ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"], dtype=bool)
    assert tokenizer.decode(ids[mask]) == "Ada.</s>\n" and "Hello, I am a guide." in tokenizer.decode(ids[~mask])
    assert counts(stats, "assistant turns that open a conversation (context, not trained)") == 4
    assert counts(stats, "skipped: no assistant turn") == 1


def test_special_token_text_in_the_data_is_text(tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos, literal = tokenizer.eos_token_id, tokenizer.eos_token  # "</s>", also the chat template's end-of-turn markup
    chat = {"messages": [{"role": "user", "content": f"Print {literal} please."},
                         {"role": "assistant", "content": f"Here: {literal} done."}]}  # fmt: skip
    _, tokenized = tokenize(tmp_path / "chat", tiny_model_dir, [chat] * 3, messages_field="messages",
                            chat_template=CHATML)  # fmt: skip
    ids = np.array(all_rows(tokenized)[0]["input_ids"])
    assert (ids == eos).sum() == 2  # the template's two end-of-turn markers only, not the two in the contents
    assert tokenizer.decode(ids) == f"<s>user\nPrint {literal} please.</s>\n<s>assistant\nHere: {literal} done.</s>\n"
    # Each content is found in its own turn: not in the end-of-turn markup before it, nor in the role names.
    reply = {"messages": [{"role": "user", "content": "user"}, {"role": "assistant", "content": literal}]}
    _, tokenized = tokenize(tmp_path / "reply", tiny_model_dir, [reply] * 3, messages_field="messages",
                            chat_template=CHATML)  # fmt: skip
    row = all_rows(tokenized)[0]
    ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"], dtype=bool)
    assert list(ids[mask][-2:]) == [eos, tokenizer("\n", add_special_tokens=False)["input_ids"][0]]
    assert (ids == eos).sum() == 2 and tokenizer.decode(ids[mask]) == f"{literal}</s>\n"
    assert eos not in ids[mask][:-2]  # the reply's literal is text
    for data, rows in (({}, [{"text": f"a {literal} b"}] * 3), ({"separator": " ###"}, [{"text": f"Q ### {literal}"}] * 3),
                       ({"prompt_field": "q", "response_field": "a"}, [{"q": literal, "a": f"x {literal}"}] * 3)):  # fmt: skip
        _, tokenized = tokenize(tmp_path / str(len(data)), tiny_model_dir, rows, **data)
        for row in all_rows(tokenized):
            assert (np.array(row["input_ids"]) == eos).sum() == 1, data  # the EOS closing the document only


def test_rows_missing_the_field_are_told_apart_from_null_ones(tmp_path, tiny_model_dir):
    rows = [{"text": "one"}, {"text": "two"}, {"other": 1}, {"text": None}, {"text": ""}, {"text": "three"}] * 4
    stats, _ = tokenize(tmp_path, tiny_model_dir, rows)
    assert counts(stats, "skipped: text missing") == 4
    assert counts(stats, "skipped: text null or empty") == 8


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: not UTF-8 text \(byte 0xe9 at column 14\)"):
        tokenize(tmp_path, tiny_model_dir, data)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a good document")
    (docs / "b.txt").write_bytes(b"first line\nsecond \xff line\n")
    with pytest.raises(DataError, match=r"b\.txt line 2: not UTF-8 text \(byte 0xff"):
        tokenize(tmp_path / "dir", tiny_model_dir, docs)


def test_a_chat_template_that_raises_names_the_key_and_the_row(tmp_path, tiny_model_dir):
    """Before, the template's own exception surfaced from inside the tokenize job without naming either."""
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    odd = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no system turn"},
                        {"role": "tool", "content": "42"}]}  # fmt: skip
    strict = CHATML.replace("{% for m in messages %}", "{% for m in messages %}{% if m['role'] == 'tool' %}"
                            "{{ raise_exception('tool turns are not supported') }}{% endif %}")  # fmt: skip
    assert strict != CHATML
    with pytest.raises(DataError, match=r"train\.jsonl: row 2: data.chat_template cannot render this conversation: "
                                        r"TemplateError: tool turns are not supported"):  # fmt: skip
        tokenize(tmp_path, tiny_model_dir, [good, odd, good], messages_field="messages", chat_template=strict)


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_and_a_missing_eos_is_the_model_s(tmp_path, tiny_model_dir,
                                                                                              corpus_rows):  # fmt: skip
    import shutil

    bigger = tmp_path / "bigger"
    shutil.copytree(tiny_model_dir, bigger)
    config = json.loads((bigger / "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    with pytest.raises(ConfigError, match=r"config key model: the tokenizer of .*bigger has 300 tokens, more than "
                                          r"the model's 200 embeddings"):  # fmt: skip
        load_tokenizer(bigger)
    no_eos = tmp_path / "no-eos"
    shutil.copytree(tiny_model_dir, no_eos)
    settings = json.loads((no_eos / "tokenizer_config.json").read_text())
    settings.pop("eos_token", None)
    (no_eos / "tokenizer_config.json").write_text(json.dumps(settings))
    assert AutoTokenizer.from_pretrained(no_eos).eos_token_id is None  # a tokenizer that names no end token
    _, tokenized = tokenize(tmp_path, no_eos, corpus_rows[:20])
    first = all_rows(tokenized)[0]["input_ids"]
    assert first[-1] == config["eos_token_id"]  # documents end with the model's EOS (config.json), as before
