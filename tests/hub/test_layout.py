"""Weights that transformers converts while loading (fused mixture-of-experts parameters): read per rank, written back
in the files' layout, adapted with LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.core_model_loading import Transpose, WeightConverter

from tests.conftest import run_on_ranks
from tests.test_architectures import build
from vectorlm.config import ConfigError, LoraSettings
from vectorlm.hub import layout as hub_layout
from vectorlm.hub.meta_model import build_empty_model, parameter_shapes
from vectorlm.hub.shards import tensor_shapes, weight_files
from vectorlm.train import base_weights
from vectorlm.train.base_weights import materialize
from vectorlm.train.distributed import build_mesh
from vectorlm.train.lora import apply_lora
from vectorlm.train.model import apply_fsdp

MOE = ["mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: build(name, root / name, tiny_model_dir) for name in MOE}


@pytest.mark.parametrize("name", MOE)
def test_each_expert_tensor_is_a_block_of_a_fused_parameter(moe_models, name):
    model = build_empty_model(moe_models[name])
    files = tensor_shapes(weight_files(moe_models[name]))
    layout = hub_layout.file_layout(model, files, parameter_shapes(model))
    pieces = layout.pieces["model.layers.1.mlp.experts.gate_up_proj"]
    assert not layout.converted and sorted(layout.file_keys) == sorted(files)  # every file tensor, once
    assert len(pieces) == 8 and {p.stacked_dim for p in pieces} == {0}  # 4 experts x (gate, up)
    gate = "w1" if name == "mixtral" else "gate_proj"
    first, last = pieces[0], pieces[-1]
    assert (
        gate in first.key and ".experts.0." in first.key and first.offsets == (0, 0, 0) and first.sizes == (1, 16, 32)
    )
    assert ".experts.3." in last.key and last.offsets == (3, 16, 0) and last.file_shape == (16, 32)


def _load(env, model_dir: str, out: str) -> None:
    reads: list[str] = []
    original = base_weights.PieceReader.read_data

    def recording(self, plan, planner):
        reads.extend(self.storage_data[item.storage_index].key for item in plan.items)
        return original(self, plan, planner)

    base_weights.PieceReader.read_data = recording
    reference = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for blocks in (True, False):
        reads.clear()
        model = build_empty_model(model_dir)
        files = tensor_shapes(weight_files(Path(model_dir)))
        layout = hub_layout.file_layout(model, files, parameter_shapes(model), blocks=blocks)
        apply_fsdp(model, build_mesh(env, "full"), mixed_precision=False)
        materialize(model, model_dir, env.device, layout=layout, converting_model=model)
        equal = all(torch.equal(v.full_tensor(), reference[k]) for k, v in model.state_dict().items())
        experts = sorted(
            {int(k.split(".experts.")[1].split(".")[0]) for k in reads if "layers.0." in k and ".experts." in k}
        )
        result = {"equal": equal, "experts": experts, "converted": len(layout.converted)}
        Path(f"{out}-{blocks}.{env.rank}").write_text(json.dumps(result))


@pytest.mark.parametrize("name", MOE)
def test_each_rank_reads_only_its_experts_and_the_fallback_loads_the_same(moe_models, name, tmp_path):
    """2 ranks: the fused experts are sharded on the expert dimension, so rank 0 reads experts 0-1 and rank 1
    experts 2-3; with every conversion left to the fallback (rank 0 reads and converts, then scatters) the weights
    are the same, equal to from_pretrained's."""
    run_on_ranks(_load, 2, str(moe_models[name]), str(tmp_path / "load"))
    for blocks in (True, False):
        ranks = [json.loads(Path(f"{tmp_path / 'load'}-{blocks}.{r}").read_text()) for r in range(2)]
        assert all(r["equal"] for r in ranks), (blocks, ranks)
        if blocks:
            assert [r["experts"] for r in ranks] == [[0, 1], [2, 3]] and ranks[0]["converted"] == 0
        else:
            assert [r["experts"] for r in ranks] == [[], []] and ranks[0]["converted"] == 4  # 2 layers x 2 params


def test_a_parameter_converted_otherwise_is_written_whole_under_its_own_name():
    layout = hub_layout.Layout(pieces={"a.weight": [hub_layout.Piece("old.a", (0, 0), (2, 3))]}, converted=[])
    transposed = WeightConverter("old.b", "b.weight", operations=[Transpose(0, 1)])
    layout.converted.append(hub_layout.Converted(transposed, layer_name="b.weight", sources={}, targets=["b.weight"]))
    written = hub_layout.written_pieces(layout, {"a.weight": (2, 3), "b.weight": (4,)})
    assert written == {"a.weight": [hub_layout.Piece("old.a", (0, 0), (2, 3))],
                       "b.weight": [hub_layout.Piece("b.weight", (0,), (4,))]}  # fmt: skip


def test_a_file_tensor_of_the_wrong_shape_is_named(moe_models):
    model = build_empty_model(moe_models["mixtral"])
    experts = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"

    def reshaped(files):
        files["model.norm.weight"] = (31,)

    def an_expert_missing(files):
        del files[experts.format(0, 2, "w1")]

    def an_expert_transposed(files):  # as many values, not a block
        files[experts.format(1, 3, "w2")] = (16, 32)

    def a_weight_missing(files):
        del files["model.norm.weight"]

    cases = [(reshaped, r"model.norm.weight has shape \(31,\), the model needs \(32,\)"),
             (an_expert_missing, (r"model.layers.0.mlp.experts.gate_up_proj \(shape \(4, 32, 32\)\) is made of 7 "
                                  r"tensors of the files that do not tile it, e.g. ")),
             (an_expert_transposed, (r"experts.down_proj \(shape \(4, 32, 16\)\) is made of 4 tensors of the files "
                                     r"that do not tile it")),
             (a_weight_missing, r"1 weight\(s\) of the model are missing, e.g. \['model.norm.weight'\]")]  # fmt: skip
    for edit, message in cases:
        files = tensor_shapes(weight_files(moe_models["mixtral"]))
        edit(files)
        with pytest.raises(ValueError, match=message):
            hub_layout.file_layout(model, files, parameter_shapes(model))


@pytest.mark.parametrize("name", MOE)
def test_lora_targets_on_mixture_of_experts_models(moe_models, name):
    def adapted(**settings) -> list[str]:
        _, initial = apply_lora(build_empty_model(moe_models[name]), LoraSettings(enabled=True, **settings), seed=0)
        return sorted({k.split("layers.0.")[1].split(".lora_")[0] for k in initial if "layers.0." in k})

    with pytest.raises(
        ConfigError,
        match=r"lora.dropout: 0.05 with lora.target_modules 'all-linear', which in "
        r"\w+ForCausalLM adapts the parameters down_proj, gate.weight, gate_up_proj",
    ):
        adapted()  # fmt: skip
    assert adapted(dropout=0.0) == ["mlp.experts", "mlp.experts.base_layer", "mlp.gate", "self_attn.k_proj",
                                    "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]  # fmt: skip
    # the fused parameters by their names, and the names of the older per-expert checkpoints, as peft translates them
    assert adapted(dropout=0.0, target_modules=("q_proj", "gate_up_proj")) == ["mlp.experts", "self_attn.q_proj"]
    legacy = ("w1", "w3", "w2") if name == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    assert adapted(dropout=0.0, target_modules=legacy) == ["mlp.experts", "mlp.experts.base_layer"]
    with pytest.raises(ConfigError, match=r"lora.target_modules: Cannot convert PEFT target\(s\) \w+ without also"):
        adapted(dropout=0.0, target_modules=legacy[:1])  # gate without up: peft fuses them into one parameter
    with pytest.raises(
        ConfigError,
        match=r"'nope' match no module of the model; its linear layers are: k_proj, "
        r"lm_head, o_proj, q_proj, v_proj; its expert parameters: down_proj, "
        r"gate_up_proj \(or use all-linear\)",
    ):
        adapted(dropout=0.0, target_modules=("q_proj", "nope"))  # fmt: skip


def test_a_name_of_a_linear_layer_and_of_fused_experts_adapts_both(tmp_path, tiny_model_dir):
    """Qwen2-MoE's down_proj is the shared expert's linear layer and the routed experts' fused parameter."""
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)  # fmt: skip
    config.save_pretrained(tmp_path)
    settings = LoraSettings(enabled=True, dropout=0.0, target_modules=("down_proj",))
    _, initial = apply_lora(build_empty_model(tmp_path), settings, seed=0)
    adapted = sorted({k.split("layers.0.")[1].split(".lora_")[0] for k in initial})
    assert adapted == ["mlp.experts", "mlp.shared_expert.down_proj"]


def test_linear_layers_that_peft_would_leave_out_are_refused(tmp_path):
    """Qwen3-MoE with a dense first layer: peft translates down_proj to the fused experts and would leave the dense
    layer's down_proj without an adapter, silently."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])  # fmt: skip
    config.save_pretrained(tmp_path)
    for targets in ("all-linear", ("down_proj",)):
        with pytest.raises(
            ConfigError, match=r"peft adapts none of model.layers.0.mlp.\w+_proj.*which .* names in Qwen3MoeForCausalLM"
        ):
            settings = LoraSettings(enabled=True, dropout=0.0, target_modules=targets)
            apply_lora(build_empty_model(tmp_path), settings, seed=0)
