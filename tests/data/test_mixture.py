"""Weighted mixtures of data sources: the config's list of sources and the sampling in pack."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from vectorlm.config import Config, ConfigError, DataConfig, read_stage_config
from vectorlm.data.pack import mixture, run_pack
from vectorlm.data.sources import DataError


def save_source(path, num_docs: int, *, seed: int, masks: bool = False, num_eval: int = 3):
    """A tokenized source (DatasetDict) of documents 5-120 tokens long whose tokens say which source they are."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", num_docs), ("eval", num_eval)):
        docs = [[seed] * int(n) for n in rng.integers(5, 120, size=count)]
        columns = {"input_ids": docs} | ({"loss_mask": [[1] * len(d) for d in docs]} if masks else {})
        splits[split] = datasets.Dataset.from_dict(columns)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


@pytest.fixture
def three_sources(tmp_path):
    """A big, a middling and a small source: weights 0.6/0.3/0.1 repeat the small one and subsample the big one."""
    return [save_source(tmp_path / name, n, seed=s) for name, n, s in (("web", 2000, 1), ("books", 300, 2),
                                                                       ("code", 40, 3))]  # fmt: skip


def realised_shares(packed_dir) -> dict[int, float]:
    """The share of training tokens of each source, counted in the packed rows themselves (tokens name sources)."""
    tokens = np.concatenate(
        [np.asarray(r, dtype=np.int64) for r in datasets.load_from_disk(str(packed_dir))["train"]["input_ids"]]
    )
    return {source: float((tokens == source).mean()) for source in (1, 2, 3)}


def test_realised_token_shares_follow_the_weights(tmp_path, three_sources):
    stats = run_pack(tokenized_dir=three_sources, max_seq_len=128, output_dir=tmp_path / "packed",
                     weights=[0.6, 0.3, 0.1], seed=0)  # fmt: skip
    shares = realised_shares(tmp_path / "packed")
    for source, weight in zip((1, 2, 3), (0.6, 0.3, 0.1)):
        assert shares[source] == pytest.approx(weight, abs=0.01), shares
    by_name = stats["sources"]
    assert list(by_name) == ["web", "books", "code"]
    assert [by_name[n]["share"] for n in by_name] == pytest.approx([shares[1], shares[2], shares[3]], abs=1e-4)
    assert by_name["web"]["times_repeated"] < 1 < by_name["code"]["times_repeated"]  # subsampled, repeated
    assert by_name["code"]["documents_sampled"] > by_name["code"]["documents"] == 40
    assert sum(s["tokens"] for s in by_name.values()) == stats["train"]["tokens"]
    assert sum(s["loss_tokens"] for s in by_name.values()) == stats["train"]["loss_tokens"]
    assert [s["eval_documents"] for s in by_name.values()] == [3, 3, 3]
    assert stats["eval"]["documents"] == 9  # eval splits are used whole, unweighted
    assert json.loads((tmp_path / "packed" / "stats.json").read_text())["sources"] == by_name
    assert "warnings" not in stats  # shares hit, nothing repeated 10 times


def test_a_heavily_repeated_source_is_named_in_a_warning(tmp_path, three_sources):
    stats = run_pack(tokenized_dir=three_sources, max_seq_len=128, output_dir=tmp_path / "packed",
                     weights=[0.4, 0.3, 0.3])  # fmt: skip
    repeated = stats["sources"]["code"]["times_repeated"]
    warning = (
        f"mixture source code is repeated {repeated:.0f} times: the model will memorise it; lower its weight or add"
    )
    assert repeated > 10 and stats["warnings"] == [f"{warning} data"]


def test_shares_hold_with_overlapping_chunks_and_the_experiment_is_recorded(tmp_path, three_sources):
    """Long documents split into overlapping chunks make more tokens than they have: sampling counts what is packed."""
    long_docs = save_source(tmp_path / "long", 30, seed=4)
    ds = datasets.load_from_disk(str(long_docs))
    datasets.DatasetDict({"train": ds["train"].map(lambda row: {"input_ids": row["input_ids"] * 12}),
                          "eval": ds["eval"]}).save_to_disk(str(tmp_path / "longer"))  # fmt: skip
    data = {"train": [{"path": "long.jsonl", "weight": 0.5}, {"path": "web.jsonl", "weight": 0.5}]}
    stats = run_pack(tokenized_dir=[tmp_path / "longer", three_sources[0]], max_seq_len=128, overlap=60,
                     output_dir=tmp_path / "packed", weights=[0.5, 0.5], data=data)  # fmt: skip
    assert [s["share"] for s in stats["sources"].values()] == pytest.approx([0.5, 0.5], abs=0.01)
    assert stats["train"]["documents_split"] > 0 and "warnings" not in stats
    assert read_stage_config(tmp_path / "packed")["data"] == data


def test_the_mixture_is_deterministic_for_a_seed(tmp_path, three_sources):
    def fingerprint(name, seed):
        return run_pack(tokenized_dir=three_sources, max_seq_len=128, output_dir=tmp_path / name,
                        weights=[0.6, 0.3, 0.1], seed=seed)["fingerprint"]  # fmt: skip

    assert fingerprint("a", 0) == fingerprint("b", 0) != fingerprint("c", 1)


def test_equal_weights_share_equally_and_without_weights_nothing_is_sampled(tmp_path, three_sources):
    stats = run_pack(tokenized_dir=three_sources[1:], max_seq_len=128, output_dir=tmp_path / "two", weights=[1, 1])
    assert [s["share"] for s in stats["sources"].values()] == pytest.approx([0.5, 0.5], abs=0.01)
    single = run_pack(tokenized_dir=three_sources[0], max_seq_len=128, output_dir=tmp_path / "one")
    assert "sources" not in single and single["train"]["chunks"] == single["train"]["documents"] == 2000


def test_mixture_sampling_repeats_whole_passes_then_draws():
    lengths = np.array([10, 10, 10, 10, 40, 40])  # source 0: 40 tokens, source 1: 80
    groups = np.array([0, 0, 0, 0, 1, 1])
    picked = mixture(lengths, groups, np.array([3.0, 1.0]), seed=0)  # 90 and 30 of 120 tokens
    counts = np.bincount(picked, minlength=6)
    assert counts[:4].sum() == 9 and set(counts[:4]) <= {2, 3}  # two whole passes and one more document
    assert counts[4:].sum() == 1  # 30 tokens: the closest is one 40-token document, not none


def test_text_and_instruction_sources_cannot_be_mixed(tmp_path):
    text = save_source(tmp_path / "text", 20, seed=1)
    chat = save_source(tmp_path / "chat", 20, seed=2, masks=True)
    with pytest.raises(DataError, match="must all be text or all instruction data"):
        run_pack(tokenized_dir=[text, chat], max_seq_len=128, output_dir=tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_a_list_of_sources_in_the_config():
    data = DataConfig(train=[{"path": "web.jsonl", "weight": 0.6},
                             {"path": "chat/part.jsonl", "weight": 0.4, "messages_field": "messages"},
                             {"path": "more/web.jsonl", "text_field": "body"}], prompt_field="q", response_field="a")  # fmt: skip
    web, chat, more = data.sources
    assert (web.name, chat.name, more.name) == ("web", "part", "web-2")
    assert (web.weight, chat.weight, more.weight) == (0.6, 0.4, 1.0)
    assert web.data.mode == "prompt_response" and web.data.train == "web.jsonl"
    assert chat.data.mode == "messages" and chat.data.prompt_field is None  # its own kind replaces data.*'s
    assert more.data.mode == "prompt_response" and more.data.text_field == "body"
    assert data.paths == {"data.train[0]": "web.jsonl", "data.train[1]": "chat/part.jsonl",
                          "data.train[2]": "more/web.jsonl"}  # fmt: skip
    assert DataConfig(train="corpus.jsonl").sources[0].name == "corpus"
    assert DataConfig(train="data/train.jsonl").sources[0].name == "train-2"  # not a split's directory
    assert [s.name for s in DataConfig(train=[{"path": ".hidden.jsonl"}, {"path": "a b.jsonl"}]).sources] == [
        "hidden", "a_b"]  # fmt: skip


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ([{"path": "a.jsonl", "prompt_field": "q"}], r"data.train\[0\] \(a.jsonl\): data.prompt_field and data.response_field go together"),
        ([{"path": "a.jsonl", "name": "x"}, {"path": "b.jsonl", "name": "x"}], r"data.train\[1\]: the name 'x' is already taken"),
        ([{"path": "a.jsonl", "weight": 0}], r"config key data.train.0.weight: 0 is less than or equal to the minimum"),
        ([{"path": "a.jsonl", "wieght": 2}], r"unknown config key data.train.0.wieght \(did you mean data.train.0.weight"),
        ([], r"config key data.train: \[\] should be non-empty"),
        ([{"path": "a.jsonl", "name": "eval"}], r"data.train\[0\]: the name 'eval' is reserved"),
        ([{"path": "a.jsonl"}, {"path": "b.jsonl", "messages_field": "m"}],
         r"must all be text or all instruction or chat data .*got a \(text\), b \(messages\)"),
    ],
)  # fmt: skip
def test_bad_sources_name_the_entry(train, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"model": "m", "output_dir": "o", "max_seq_len": 128, "data": {"train": train}})


def test_weights_written_as_strings_are_numbers():
    config = Config.from_dict({"model": "m", "output_dir": "o", "max_seq_len": 128,
                               "data": {"train": [{"path": "a.jsonl", "weight": "1e-1"}]}})  # fmt: skip
    assert config.data.sources[0].weight == 0.1


def test_a_mixture_with_an_eval_file_evaluates_on_that_file(tmp_path, tiny_model_dir, corpus_rows):
    """data.eval beside a mixture: the first source's tokenize job reads the eval file, the others have no eval split
    of their own (an empty split that datasets could not load back, before), and pack evaluates on the file alone."""
    import dataclasses

    from tests.conftest import write_jsonl
    from vectorlm.data.tokenize import run_tokenize

    paths = {name: str(write_jsonl(tmp_path / f"{name}.jsonl", rows)) for name, rows in (
        ("web", corpus_rows[:200]), ("books", corpus_rows[200:300]), ("code", corpus_rows[300:340]),
        ("held_out", corpus_rows[400:430]))}  # fmt: skip
    data = DataConfig(train=tuple({"path": paths[n]} for n in ("web", "books", "code")), eval=paths["held_out"])
    tokenized = []
    for index, source in enumerate(data.sources):  # as the workflow's tokenize jobs do (pipeline/cache_keys.py)
        settings = {**dataclasses.asdict(source.data), "eval": data.eval if index == 0 else None}
        tokenized.append(tmp_path / source.name)
        run_tokenize(model_dir=tiny_model_dir, data=DataConfig(**settings), output_dir=tokenized[-1], hold_out=False)
    stats = run_pack(tokenized_dir=tokenized, max_seq_len=128, output_dir=tmp_path / "packed", weights=[0.6, 0.3, 0.1],
                     names=[s.name for s in data.sources])  # fmt: skip
    assert stats["eval"]["documents"] == 30 and stats["train"]["documents"] > 0
    assert [s["eval_documents"] for s in stats["sources"].values()] == [30, 0, 0]
    assert len(datasets.load_from_disk(str(tmp_path / "packed"))["eval"]) == stats["eval"]["rows"] > 0
