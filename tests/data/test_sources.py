"""Every input format, and the errors bad input gets (file, line or row named)."""

import json

import datasets
import pytest

from tests.conftest import write_jsonl
from vectorlm.data.sources import DataError, check_source, load_documents

ROWS = [{"text": "first document", "n": 1}, {"text": "second one", "n": 2}, {"text": "third", "n": 3}]


def texts(dataset):
    return sorted(dataset["text"])


@pytest.fixture
def sources(tmp_path):
    """The same three documents in every supported format."""
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS)}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(ROWS))
    paths["parquet"] = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(paths["parquet"]))
    paths["text_dir"] = tmp_path / "docs"
    (paths["text_dir"] / "sub").mkdir(parents=True)
    (paths["text_dir"] / "a.txt").write_text(ROWS[0]["text"])
    (paths["text_dir"] / "b.md").write_text(ROWS[1]["text"])
    (paths["text_dir"] / "sub" / "c.txt").write_text(ROWS[2]["text"])
    (paths["text_dir"] / "ignored.csv").write_text("not,a,document")
    paths["saved"] = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(paths["saved"]))
    paths["saved_dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "other": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(paths["saved_dict"]))
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "text_dir", "saved", "saved_dict"])
def test_every_format_reads_the_same_documents(sources, tmp_path, kind):
    split = "train" if kind == "saved_dict" else None
    check_source(sources[kind], key="data.train", fields={"text": "data.text_field"}, split=split)
    dataset = load_documents(sources[kind], cache_dir=tmp_path / "cache", split=split)
    assert texts(dataset) == sorted(r["text"] for r in ROWS)


def test_text_directory_documents_take_the_configured_field_name(sources, tmp_path):
    dataset = load_documents(sources["text_dir"], cache_dir=tmp_path / "cache", text_field="body")
    assert dataset.column_names == ["body"] and len(dataset) == 3


def test_dataset_dict_needs_a_split(sources, tmp_path):
    with pytest.raises(DataError, match=r"config key data\.split: .* splits train, other; choose one \(got None\)"):
        check_source(sources["saved_dict"], key="data.train", fields={"text": "data.text_field"})
    with pytest.raises(DataError, match=r"has splits train, other; choose one \(got 'test'\)"):
        load_documents(sources["saved_dict"], cache_dir=tmp_path / "cache", split="test")


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved"])
def test_missing_field_names_the_key_and_the_fields_found(sources, kind):
    with pytest.raises(
        DataError, match=r"rows have no field 'prompt' \(config key data\.prompt_field\); fields found: text, n"
    ):
        check_source(sources[kind], key="data.train", fields={"prompt": "data.prompt_field"})


def test_malformed_json_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken\n{"text": "after"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: invalid JSON"):
        load_documents(path, cache_dir=tmp_path / "cache")


def test_bad_paths(tmp_path):
    (tmp_path / "data.csv").write_text("a\n")
    with pytest.raises(DataError, match=r"unsupported data format '\.csv'; use \.jsonl, \.json, \.parquet"):
        check_source(tmp_path / "data.csv", key="data.train", fields={})
    with pytest.raises(DataError, match=r"config key data\.eval: data file .*nope\.jsonl does not exist"):
        check_source(tmp_path / "nope.jsonl", key="data.eval", fields={})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"data file .*empty\.jsonl is empty"):
        check_source(tmp_path / "empty.jsonl", key="data.train", fields={})
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl has no rows"):
        check_source(tmp_path / "blank.jsonl", key="data.train", fields={})
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"directory .*nothing holds no \.txt or \.md files"):
        check_source(tmp_path / "nothing", key="data.train", fields={})


def test_hidden_files_and_directories_are_not_documents(tmp_path):
    docs = tmp_path / "docs"
    for hidden in (".git", ".cache/sub"):
        (docs / hidden).mkdir(parents=True)
        (docs / hidden / "notes.txt").write_text("not a document")
    (docs / ".draft.md").write_text("not a document either")
    (docs / "story.txt").write_text("the only document")
    assert texts(load_documents(docs, cache_dir=tmp_path / "cache")) == ["the only document"]


def test_json_arrays_are_checked_before_any_job(tmp_path):
    (tmp_path / "empty.json").write_text(" [ ]\n")
    with pytest.raises(DataError, match=r"empty\.json holds an empty JSON array: it has no rows"):
        check_source(tmp_path / "empty.json", key="data.train", fields={"text": "data.text_field"})
    (tmp_path / "rows.json").write_text(json.dumps([{"body": "a"}, {"body": "b"}]))
    with pytest.raises(
        DataError, match=r"rows have no field 'text' \(config key data\.text_field\); fields found: body"
    ):
        check_source(tmp_path / "rows.json", key="data.train", fields={"text": "data.text_field"})
    (tmp_path / "strings.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(DataError, match=r"strings\.json is a JSON array of str, not of objects"):
        check_source(tmp_path / "strings.json", key="data.train", fields={"text": "data.text_field"})


def test_a_first_line_that_is_not_utf8_fails_before_any_job(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "Zürich"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl line 1: not UTF-8 text \(byte 0xfc"):
        check_source(tmp_path / "latin1.jsonl", key="data.train", fields={"text": "data.text_field"})
