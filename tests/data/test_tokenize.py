import json

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.conftest import write_jsonl
from vectorlm.config import DataConfig
from vectorlm.data.tokenize import document_boundaries, run_tokenize
from vectorlm.inputs import DataError


def gpt2_style_tokenizer(texts) -> PreTrainedTokenizerFast:
    """BOS == EOS == <|endoftext|> and no pad token, like GPT-2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_llama_style_documents_get_bos_and_eos(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token is None
    prefix, suffix = document_boundaries(tokenizer)
    assert prefix == [tokenizer.bos_token_id] and suffix == [tokenizer.eos_token_id]


def test_gpt2_style_documents_get_one_separator(corpus_rows):
    tokenizer = gpt2_style_tokenizer(r["text"] for r in corpus_rows[:200])
    assert tokenizer.bos_token_id == tokenizer.eos_token_id and tokenizer.pad_token is None
    assert document_boundaries(tokenizer) == ([], [tokenizer.eos_token_id])


def test_tokenize_counts_and_splits(tmp_path, tiny_model_dir, corpus_rows):
    rows = corpus_rows[:100]
    data = DataConfig(train=str(write_jsonl(tmp_path / "train.jsonl", rows)), eval_fraction=0.1)
    stats = run_tokenize(model_dir=tiny_model_dir, data=data, output_dir=tmp_path / "tok")
    tokenized = datasets.load_from_disk(str(tmp_path / "tok"))
    assert len(tokenized["train"]) == 90 and len(tokenized["eval"]) == 10
    assert stats["train"]["documents"] == 90
    assert stats["train"]["tokens"] == sum(len(ids) for ids in tokenized["train"]["input_ids"])
    assert json.loads((tmp_path / "tok" / "stats.json").read_text())["eval"] == stats["eval"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    by_text = {tokenizer.decode(ids, skip_special_tokens=True): ids for ids in tokenized["train"]["input_ids"]}
    text = next(t for t in (r["text"] for r in rows) if t in by_text)
    expected = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert by_text[text] == expected + [tokenizer.eos_token_id]


def test_explicit_eval_file(tmp_path, tiny_model_dir, corpus_rows):
    data = DataConfig(
        train=str(write_jsonl(tmp_path / "train.jsonl", corpus_rows[:20])),
        eval=str(write_jsonl(tmp_path / "eval.jsonl", corpus_rows[20:23])),
    )
    stats = run_tokenize(model_dir=tiny_model_dir, data=data, output_dir=tmp_path / "tok")
    assert stats["train"]["documents"] == 20 and stats["eval"]["documents"] == 3


def test_custom_text_field(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "hello there"}, {"body": "general kenobi"}])
    stats = run_tokenize(
        model_dir=tiny_model_dir, data=DataConfig(train=str(path), text_field="body"), output_dir=tmp_path / "tok"
    )
    assert stats["train"]["documents"] + stats["eval"]["documents"] == 2


def test_missing_text_field_names_file_and_fields(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "a"}, {"body": "b"}])
    with pytest.raises(DataError, match=r"t\.jsonl: rows have no field 'text' \(data\.text_field\); fields found: body"):
        run_tokenize(model_dir=tiny_model_dir, data=DataConfig(train=str(path)), output_dir=tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_null_text_names_the_row(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"text": "also fine"}, {"text": None}])
    with pytest.raises(DataError, match=r"t\.jsonl: row 3: field 'text' is None, not a string"):
        run_tokenize(model_dir=tiny_model_dir, data=DataConfig(train=str(path)), output_dir=tmp_path / "tok")


def test_missing_and_empty_files(tmp_path, tiny_model_dir):
    with pytest.raises(DataError, match=r"config key data\.train: data file .*nope\.jsonl does not exist"):
        run_tokenize(model_dir=tiny_model_dir, data=DataConfig(train=str(tmp_path / "nope.jsonl")), output_dir=tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"data file .*empty\.jsonl is empty"):
        run_tokenize(model_dir=tiny_model_dir, data=DataConfig(train=str(tmp_path / "empty.jsonl")), output_dir=tmp_path)


def test_single_document_cannot_be_split(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "alone"}])
    with pytest.raises(DataError, match=r"data\.train has 1 document; holding out an eval split"):
        run_tokenize(model_dir=tiny_model_dir, data=DataConfig(train=str(path)), output_dir=tmp_path / "tok")
