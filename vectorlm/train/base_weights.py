"""The base model's weights read into the sharded model: each rank reads from the safetensors files only the parts of
the file tensors that its FSDP2 shards cover, as transformers' conversion mapping places them
(:mod:`vectorlm.hub.layout`); conversions that are not blocks of a parameter are read by rank 0 and scattered.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import PreTrainedModel

from vectorlm.hub.layout import Converted, Layout, file_layout
from vectorlm.hub.meta_model import parameter_shapes, tied_parameter_names
from vectorlm.hub.shards import DTYPES, read_header, read_rows, tensor_shapes, weight_files
from vectorlm.train.lora import base_weight_name

log = logging.getLogger(__name__)


def weight_layout(model: PreTrainedModel, model_dir: str | Path) -> Layout:
    """How the weights of the plain (not yet wrapped or sharded) ``model`` lie in the safetensors files of
    ``model_dir``, through transformers' conversions (:mod:`vectorlm.hub.layout`)."""
    try:
        return file_layout(model, tensor_shapes(weight_files(Path(model_dir))), parameter_shapes(model))
    except ValueError as error:
        raise RuntimeError(f"cannot load the weights of {model_dir} into {type(model).__name__}: {error}") from error


def materialize(
    model: nn.Module, model_dir: str | Path, device: torch.device, *, layout: Layout,
    group: dist.ProcessGroup | None = None, converting_model: PreTrainedModel | None = None,
) -> None:  # fmt: skip
    """Allocates the (sharded) parameters on ``device`` and fills the base weights from the safetensors files in
    ``model_dir`` as ``layout`` places them; each rank reads only the parts of the files its shards cover (DCP
    coordinates the ranks over ``group``), except for conversions that are not blocks of a parameter, which rank 0
    reads and scatters (``converting_model`` is the plain model their operations are given). LoRA adapters, if any,
    are left for :mod:`vectorlm.train.lora`."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    tied = tied_parameter_names(model)
    state = {base_weight_name(k): v for k, v in model.state_dict().items() if k not in tied and base_weight_name(k)}
    try:
        dcp.load({name: state[name] for name in layout.pieces}, storage_reader=PieceReader(model_dir, layout),
                 process_group=group)  # fmt: skip
        if layout.converted:
            log.info("%d weight group(s) converted on rank 0 and scattered (%s)", len(layout.converted),
                     ", ".join(str(g.converter.operations) for g in layout.converted[:2]))  # fmt: skip
            load_converted(converting_model or model, model_dir, layout.converted, state)
    except Exception as error:  # DCP wraps per-rank failures; say which model could not be read.
        raise RuntimeError(f"cannot load the weights of {model_dir} into the model: {error}") from error


@dataclasses.dataclass(frozen=True)
class _Stored:
    relative_path: str
    key: str
    stacked_dim: int | None


class PieceReader(HuggingFaceStorageReader):
    """DCP's reader of Hugging Face safetensors, presenting each parameter as one tensor whose stored chunks are its
    pieces: DCP's planner then reads on each rank only the pieces (and the parts of them) that its shards cover."""

    def __init__(self, path: str | Path, layout: Layout) -> None:
        super().__init__(str(path))
        self.layout = layout

    def read_metadata(self) -> Metadata:
        files = weight_files(Path(self.path))
        headers = {path: read_header(path) for path in sorted(set(files.values()))}
        tensors: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, _Stored] = {}
        for name, pieces in self.layout.pieces.items():
            dtype = DTYPES[headers[files[pieces[0].key]][pieces[0].key]["dtype"]]
            size = torch.Size(max(p.offsets[d] + p.sizes[d] for p in pieces) for d in range(len(pieces[0].sizes)))
            chunks = [ChunkStorageMetadata(torch.Size(p.offsets), torch.Size(p.sizes)) for p in pieces]
            tensors[name] = TensorStorageMetadata(TensorProperties(dtype=dtype), size, chunks)
            for p in pieces:
                relative = str(files[p.key].relative_to(self.path))  # index entries may name subdirectories
                storage[MetadataIndex(name, p.offsets)] = _Stored(relative, p.key, p.stacked_dim)
        metadata = Metadata(state_dict_metadata=tensors, storage_data=storage)
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata

    def read_data(self, plan, planner):
        """Reads each request's rows of its file tensor with plain reads, not safetensors' memory map, whose touched
        pages would count as this rank's memory until the file is closed (FSDP2 shards the first dimension, so a
        rank's part of a tensor is a range of rows)."""
        per_file = defaultdict(list)
        for request in plan.items:
            per_file[self.storage_data[request.storage_index].relative_path].append(request)
        for file_name, requests in per_file.items():
            path = Path(self.path) / file_name
            header = read_header(path)
            with open(path, "rb") as f:
                for request in requests:
                    stored = self.storage_data[request.storage_index]
                    slices = [slice(o, o + n) for o, n in zip(request.storage_offsets, request.lengths, strict=True)]
                    if stored.stacked_dim is not None:
                        del slices[stored.stacked_dim]
                    if slices:  # a range of rows, then the part of each row
                        rows = read_rows(f, header, stored.key, slices[0].start, slices[0].stop)
                        block = rows[(slice(None), *slices[1:])]
                    else:  # a 0-d tensor
                        block = read_rows(f, header, stored.key)
                    target = planner.resolve_tensor(request).detach()
                    target.copy_(block.reshape(request.lengths))
                    planner.commit_tensor(request, target)
        future = torch.futures.Future()
        future.set_result(None)
        return future


def load_converted(model: torch.nn.Module, model_dir: str | Path, groups: list[Converted], state: dict) -> None:
    """Fills the parameters of ``groups`` in ``state`` (full tensors, or FSDP2's DTensor shards): rank 0 reads the
    group's file tensors and converts them with transformers' own operations, then each parameter is scattered from
    it. Memory: on rank 0, one group's file tensors and converted parameters in host memory (e.g. a layer's experts,
    twice); on every rank, each converted parameter whole on its device while it is scattered."""
    files = weight_files(Path(model_dir))
    reads = not dist.is_initialized() or dist.get_rank() == 0
    for converted in groups:
        outputs = {}
        if reads:
            converter = deepcopy(converted.converter)
            for key, pattern in converted.sources.items():
                with safe_open(str(files[key]), framework="pt") as f:
                    converter.add_tensor(converted.layer_name, key, pattern, f.get_tensor(key))
            outputs = converter.convert(converted.layer_name, model=model, config=model.config)
        for target in converted.targets:
            param = state[target]
            full = outputs[target] if reads else torch.empty(param.shape, dtype=param.dtype, device=param.device)
            full = (full[0] if isinstance(full, list) else full).to(param.device, param.dtype)
            with torch.no_grad():
                if isinstance(param, DTensor):
                    shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=0)
                    param.to_local().copy_(shard.to_local())
                else:
                    param.copy_(full)
