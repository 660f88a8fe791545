"""consolidate and convert_hf on checkpoints written by real training runs."""

import json
import shutil

import datasets
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from tests.conftest import CORPUS, run_training
from vectorlm.config import ExportConfig, read_stage_config
from vectorlm.data.loader import fetch
from vectorlm.example.tiny_llama import build_example_model
from vectorlm.export.consolidate import consolidate
from vectorlm.export.convert import check_export, convert_hf, smoke_test
from vectorlm.hub.shards import INDEX_FILE
from vectorlm.train.step import loss_sum

TRAIN = {"max_steps": 6, "lr": 3e-3, "micro_batch_size": 4, "global_batch_size": 8, "mixed_precision": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, packed_dir):
    root = tmp_path_factory.mktemp("trained")
    return root, run_training(root, tiny_model_dir, packed_dir, **TRAIN)["summary"]


def eval_loss(model, packed_dir) -> float:
    rows = datasets.load_from_disk(str(packed_dir))["eval"]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 4):
            batch = fetch(rows, torch.arange(start, min(start + 4, len(rows))).numpy(), flatten=False)
            total += loss_sum(model, batch).item()
            tokens += batch["num_loss_tokens"]
    return total / tokens


def test_exported_model_reproduces_the_training_eval_loss(trained, tiny_model_dir, packed_dir):
    root, summary = trained
    consolidate(
        summary["checkpoint"], model_dir=tiny_model_dir, output_dir=root / "consolidated", export=ExportConfig()
    )
    convert_hf(root / "consolidated", model_dir=tiny_model_dir, output_dir=root / "hf", smoke_test_prompt="Once")
    model = AutoModelForCausalLM.from_pretrained(root / "hf", attn_implementation="sdpa")
    assert eval_loss(model, packed_dir) == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert eval_loss(base, packed_dir) == pytest.approx(summary["initial_eval_loss"], rel=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    output = model.generate(**tokenizer("Once upon", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert output.shape[1] > 2
    resolved = read_stage_config(root / "hf")
    assert resolved["train"]["max_steps"] == 6 and resolved["max_seq_len"] == 128
    assert resolved["export"]["smoke_test_prompt"] == "Once"
    assert {p.name for p in (root / "hf").iterdir()} >= {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", INDEX_FILE,
    }  # fmt: skip


def test_sharded_bf16_export(trained, tiny_model_dir):
    root, summary = trained
    out = root / "sharded"
    stats = consolidate(
        summary["checkpoint"], model_dir=tiny_model_dir, output_dir=out,
        export=ExportConfig(max_shard_size="100KB", dtype="bfloat16"),
    )  # fmt: skip
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert stats["files"] == len(files) > 1 and not list(out.glob("*.pt"))
    reference = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    assert set(index["weight_map"]) == set(reference.state_dict())
    for name in files:
        with safe_open(out / name, framework="pt") as f:
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())  # noqa: SIM118 (not a dict)
    convert_hf(out, model_dir=tiny_model_dir, output_dir=root / "hf_bf16")
    model = AutoModelForCausalLM.from_pretrained(root / "hf_bf16")
    assert model.dtype == torch.bfloat16
    assert json.loads((root / "hf_bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_embeddings_export(tmp_path, packed_dir):
    model_dir = build_example_model(
        CORPUS, tmp_path / "tied", vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, tie_word_embeddings=True
    )
    model = LlamaForCausalLM.from_pretrained(model_dir)
    assert "lm_head.weight" not in safe_open(model_dir / "model.safetensors", "pt").keys()  # noqa: SIM118
    summary = run_training(tmp_path / "run", model_dir, packed_dir, **{**TRAIN, "max_steps": 2})["summary"]
    consolidate(summary["checkpoint"], model_dir=model_dir, output_dir=tmp_path / "c", export=ExportConfig())
    convert_hf(tmp_path / "c", model_dir=model_dir, output_dir=tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(exported.model.embed_tokens.weight, model.model.embed_tokens.weight)  # it trained
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    assert "lm_head.weight" not in index["weight_map"]


def test_checkpoint_of_another_model_is_refused(trained, tmp_path):
    _root, summary = trained
    other = build_example_model(CORPUS, tmp_path / "other", vocab_size=300, hidden_size=64, num_layers=3, num_heads=2)
    with pytest.raises(ValueError, match=r"lacks weights of .*other: model\.layers\.2\."):
        consolidate(summary["checkpoint"], model_dir=other, output_dir=tmp_path / "c", export=ExportConfig())


def test_check_export_finds_missing_misshapen_and_mistyped_weights(trained, tiny_model_dir, tmp_path):
    root, summary = trained
    consolidated = root / "consolidated-check"
    consolidate(summary["checkpoint"], model_dir=tiny_model_dir, output_dir=consolidated,
                export=ExportConfig(max_shard_size="100KB"))  # fmt: skip
    good = tmp_path / "good"
    convert_hf(consolidated, model_dir=tiny_model_dir, output_dir=good)
    assert check_export(good) == json.loads((good / INDEX_FILE).read_text())["metadata"]["total_size"]

    def broken(name, edit):
        target = tmp_path / name
        shutil.copytree(good, target)
        index = json.loads((target / INDEX_FILE).read_text())
        edit(target, index)
        (target / INDEX_FILE).write_text(json.dumps(index))
        return target

    def drop_one(target, index):
        file = index["weight_map"]["model.norm.weight"]
        tensors = load_file(target / file)
        del tensors["model.norm.weight"], index["weight_map"]["model.norm.weight"]
        save_file(tensors, target / file, metadata={"format": "pt"})

    def reshape_one(target, index):
        file = index["weight_map"]["model.norm.weight"]
        tensors = load_file(target / file)
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1]
        save_file(tensors, target / file, metadata={"format": "pt"})

    def retype_one(target, index):
        file = index["weight_map"]["model.norm.weight"]
        tensors = load_file(target / file)
        tensors["model.norm.weight"] = tensors["model.norm.weight"].bfloat16()
        save_file(tensors, target / file, metadata={"format": "pt"})

    def lose_a_file(target, index):
        (target / index["weight_map"]["model.norm.weight"]).unlink()

    cases = [(drop_one, r"1 weight\(s\) of the model are missing, e.g. \['model.norm.weight'\]"),
             (reshape_one, r"model.norm.weight has shape \(63,\), the model needs \(64,\)"),
             (retype_one, r"model.norm.weight is torch.bfloat16, but config.json says torch.float32"),
             (lose_a_file, r"names model-\d+-of-\d+.safetensors, which does not exist")]  # fmt: skip
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            check_export(broken(edit.__name__, edit))


def test_the_smoke_test_generates_only_below_the_size_limit(trained, tiny_model_dir, caplog):
    root, summary = trained
    consolidate(summary["checkpoint"], model_dir=tiny_model_dir, output_dir=root / "c-smoke", export=ExportConfig())
    convert_hf(root / "c-smoke", model_dir=tiny_model_dir, output_dir=root / "hf-smoke")
    size = check_export(root / "hf-smoke")
    assert isinstance(smoke_test(root / "hf-smoke", prompt="Once", max_bytes=size), str)
    with caplog.at_level("INFO"):
        assert smoke_test(root / "hf-smoke", prompt="Once", max_bytes=size - 1) is None
    assert "not loading the model to generate" in caplog.text and "export.smoke_test_max_size" in caplog.text


def edited_metadata(checkpoint, target, edit):
    """A copy of ``checkpoint`` at ``target`` whose DCP metadata ``edit`` changed (a crafted or damaged checkpoint)."""
    import pickle

    shutil.copytree(checkpoint, target)
    metadata = pickle.loads((target / ".metadata").read_bytes())  # written by this module's own training run
    edit(metadata.state_dict_metadata)
    (target / ".metadata").write_bytes(pickle.dumps(metadata))
    return target


def test_a_checkpoint_that_claims_another_shape_or_leaves_rows_out_is_not_exported(trained, tiny_model_dir, tmp_path):
    """Before, consolidate wrote such a tensor with uninitialised rows, and the export's check (headers only) passed."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    _root, summary = trained
    name = "model.model.norm.weight"

    def claim_a_longer_tensor(entries):
        entries[name].size = torch.Size([entries[name].size[0] * 2])

    def lose_a_chunk(entries):
        entries[name].chunks = entries[name].chunks[:1]

    def overlap(entries):
        first = entries[name].chunks[0]
        entries[name].chunks = [first, ChunkStorageMetadata(first.offsets, first.sizes)]

    def claim_integers(entries):  # as many bytes as fp32: read, the values would be cast from int32
        entries[name].properties.dtype = torch.int32

    cases = [(claim_a_longer_tensor, r"model.model.norm.weight is stored as \(128,\), the model's is \(64,\)"),
             (claim_integers, r"model.model.norm.weight is stored as torch.int32; a model's weights are floating"),
             (lose_a_chunk, r"the chunks of model.model.norm.weight do not cover all of it"),
             (overlap, r"chunks of model.model.norm.weight overlap")]  # fmt: skip
    for edit, message in cases:
        crafted = edited_metadata(summary["checkpoint"], tmp_path / edit.__name__ / "step_6", edit)
        with pytest.raises(ValueError, match=message):
            consolidate(crafted, model_dir=tiny_model_dir, output_dir=tmp_path / edit.__name__ / "c",
                        export=ExportConfig())  # fmt: skip
        assert not (tmp_path / edit.__name__ / "c" / INDEX_FILE).exists()


def test_the_export_check_reads_every_tensor_s_data_against_its_checksum(trained, tiny_model_dir, tmp_path):
    _root, summary = trained
    consolidate(summary["checkpoint"], model_dir=tiny_model_dir, output_dir=tmp_path / "c", export=ExportConfig())
    convert_hf(tmp_path / "c", model_dir=tiny_model_dir, output_dir=tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    assert len(index["metadata"]["sha256"]) == len(index["weight_map"])
    assert check_export(tmp_path / "hf") == index["metadata"]["total_size"]
    for damage, message in (("flip", "the data of model.norm.weight is not what was written"),
                            ("truncate", r"bytes, but its header describes .*: the file is damaged")):  # fmt: skip
        copy = tmp_path / damage
        shutil.copytree(tmp_path / "hf", copy)  # hard links of consolidate's files: copies of their own here
        file = copy / index["weight_map"]["model.norm.weight"]
        data = bytearray(file.read_bytes())
        header = int.from_bytes(data[:8], "little")
        entry = json.loads(data[8 : 8 + header])["model.norm.weight"]
        if damage == "flip":  # one byte inside the tensor: the headers, shapes and file length all still agree
            data[8 + header + entry["data_offsets"][0] + 5] ^= 0xFF
        else:
            data = data[:-4]
        file.unlink()
        file.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=message):
            check_export(copy)
    unrecorded = tmp_path / "unrecorded"  # an index whose checksums were removed checks nothing: refused
    shutil.copytree(tmp_path / "hf", unrecorded)
    del index["metadata"]["sha256"]["model.norm.weight"]
    (unrecorded / INDEX_FILE).unlink()
    (unrecorded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"no checksum of model\.norm\.weight is recorded"):
        check_export(unrecorded)


def test_auto_exports_the_base_checkpoint_s_own_dtype(trained, tiny_model_dir, tmp_path):
    """A bf16 base whose config.json declares no dtype: before, auto exported fp32 weights (the dtype of the model
    training builds) under a config.json that said bfloat16."""
    _root, summary = trained
    base = tmp_path / "bf16-base"
    LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    for tokenizer_file in tiny_model_dir.glob("*token*"):
        shutil.copy(tokenizer_file, base)
    config = json.loads((base / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (base / "config.json").write_text(json.dumps(config))
    consolidate(summary["checkpoint"], model_dir=base, output_dir=tmp_path / "c", export=ExportConfig())
    convert_hf(tmp_path / "c", model_dir=base, output_dir=tmp_path / "hf", smoke_test_prompt="Once")
    with safe_open(str(next((tmp_path / "hf").glob("*.safetensors"))), framework="pt") as f:
        names = f.keys()
        assert {f.get_slice(name).get_dtype() for name in names} == {"BF16"}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16
