"""Where a model's parameters lie in its Hugging Face safetensors files, as transformers' own conversion mapping says.

transformers 5 holds some weights in another form in the model than in the files: the experts of a mixture-of-experts
layer are one 3-D parameter in the model (``mlp.experts.gate_up_proj``, experts x (gate + up) x hidden) and one
tensor per expert and projection in the files (``mlp.experts.3.gate_proj.weight``), and older checkpoints use older
names (Mixtral's ``block_sparse_moe.experts.3.w1.weight``). ``from_pretrained`` converts between them with the
renamings and converters of ``transformers.conversion_mapping``. Nothing here is written per architecture: the same
mapping is read and its merges (stacking experts) and concatenations (gate beside up) are expressed as *pieces*: each
file tensor is a block of one parameter at known offsets. Then:

- training reads, on each rank, only the pieces its FSDP2 shards cover: 1/N of the experts
  (vectorlm/train/base_weights.py);
- :func:`written_pieces` gives consolidation and merging the base model's own layout to write (per-expert tensors
  where the base checkpoint has them), which ``from_pretrained`` loads as it loads the base;
- conversions that are not blocks of a parameter (transposes, interleavings, splits of one file tensor into several
  parameters, dequantisation) are kept as :class:`Converted` groups, which training loads with transformers' own
  operations on one rank and scatters.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from copy import deepcopy

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One tensor of the files as a block of a model parameter."""

    key: str  # its name in the files
    offsets: tuple[int, ...]  # where the block starts in the parameter
    sizes: tuple[int, ...]  # the block's extent (1 along stacked_dim)
    stacked_dim: int | None = None  # the parameter's dimension that the file tensor lacks (the expert index)

    @property
    def file_shape(self) -> tuple[int, ...]:
        return tuple(n for d, n in enumerate(self.sizes) if d != self.stacked_dim)


@dataclasses.dataclass
class Converted:
    """File tensors that transformers turns into parameters by operations that are not blocks (loaded whole)."""

    converter: WeightConverter
    layer_name: str  # the first target, as transformers' loader names the group
    sources: dict[str, str]  # file key -> the converter's source pattern it matched
    targets: list[str]  # the parameters it produces


@dataclasses.dataclass
class Layout:
    pieces: dict[str, list[Piece]]  # parameter -> the file tensors it is made of
    converted: list[Converted]

    @property
    def file_keys(self) -> list[str]:
        """Every file tensor the model reads, in the parameters' order."""
        keys = [piece.key for pieces in self.pieces.values() for piece in pieces]
        return keys + [key for group in self.converted for key in group.sources]


def _mapping(model: torch.nn.Module) -> tuple[list[WeightRenaming], list[WeightConverter]]:
    mapping = get_model_conversion_mapping(model)  # with the legacy renamings, as from_pretrained
    return ([m for m in mapping if isinstance(m, WeightRenaming)],
            [m for m in mapping if isinstance(m, WeightConverter)])  # fmt: skip


def _blocks(
    converter: WeightConverter, keys: dict[str, list[str]], shapes: dict[str, tuple[int, ...]], name: str,
    target: tuple[int, ...],
) -> list[Piece] | None:  # fmt: skip
    """The pieces of a converter that stacks (MergeModulelist) and/or concatenates file tensors into the parameter
    ``name`` of shape ``target``; None for any other conversion; a ValueError when they do not fill it."""
    ops = [type(op) for op in converter.operations]
    if (
        ops not in ([MergeModulelist], [Concatenate], [MergeModulelist, Concatenate])
        or len(converter.target_patterns) != 1
    ):
        return None
    stacked = converter.operations[0].dim % len(target) if ops[0] is MergeModulelist else None
    cat = converter.operations[-1].dim % len(target) if ops[-1] is Concatenate else None
    if stacked is not None and stacked == cat:  # experts concatenated along the stacking dimension: not blocks here
        return None
    if cat is None and len(keys) != 1:
        return None
    rank = len(target) - (stacked is not None)
    if any(len(shapes[key]) != rank for group in keys.values() for key in group):
        return _refuse(name, keys, shapes, target)
    pieces, cat_offset = [], 0
    for pattern in converter.source_patterns:
        group = keys.get(pattern, [])
        if stacked is None and len(group) != 1:
            return None
        extent = 0
        for index, key in enumerate(group):
            sizes, offsets = list(shapes[key]), [0] * len(shapes[key])
            if stacked is not None:
                sizes.insert(stacked, 1)
                offsets.insert(stacked, index)
            if cat is not None:
                offsets[cat] += cat_offset
                extent = sizes[cat]
            pieces.append(Piece(key, tuple(offsets), tuple(sizes), stacked))
        cat_offset += extent
    # The pieces must tile the parameter: one tensor per expert, of one shape per pattern, the concatenated extents
    # adding up, every other dimension whole. from_pretrained refuses anything else (a transposed expert tensor).
    fits = all(len({shapes[key] for key in group}) == 1 for group in keys.values())
    fits = fits and all(p.sizes[d] == target[d] for p in pieces for d in range(len(target)) if d not in (stacked, cat))
    fits = fits and (stacked is None or all(len(group) == target[stacked] for group in keys.values()))
    fits = fits and (cat is None or cat_offset == target[cat])
    if not fits:
        return _refuse(name, keys, shapes, target)
    return pieces


def _refuse(name: str, keys: dict[str, list[str]], shapes: dict[str, tuple[int, ...]], target: tuple[int, ...]):
    found = [key for group in keys.values() for key in group]
    raise ValueError(f"{name} (shape {target}) is made of {len(found)} tensors of the files that do not tile it, e.g. "
                     f"{found[0]} of shape {shapes[found[0]]}")  # fmt: skip


def file_layout(
    model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], params: dict[str, tuple[int, ...]],
    *, blocks: bool = True,
) -> Layout:  # fmt: skip
    """How the parameters ``params`` (name -> shape, names as in the plain transformers model) of ``model`` are made
    of the file tensors ``shapes``, as ``from_pretrained`` would load them. With ``blocks=False`` every conversion is
    left to :class:`Converted` groups, even stacking and concatenating.

    Raises:
        ValueError: naming parameters that no file tensor provides, or a file tensor of the wrong shape.
    """
    if quantization := getattr(model.config, "quantization_config", None):
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise ValueError(f"the checkpoint is quantized ({method}); training reads unquantized weights (bf16, fp16 or "
                         "fp32): use the unquantized model")  # fmt: skip
    renamings, converters = _mapping(model)
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    meta = dict(params)
    pieces: dict[str, list[Piece]] = {}
    groups: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for key in sorted(shapes, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if target not in meta and key in meta:  # as transformers' loader: the plain name when the renamed one misses
            target, pattern = key, None
        if target not in meta:
            continue
        if pattern is None:
            if tuple(shapes[key]) != meta[target]:
                needs = "the model needs" if key == target else f"the model's {target} needs"
                raise ValueError(f"{key} has shape {tuple(shapes[key])}, {needs} {meta[target]}")
            pieces[target] = [Piece(key, (0,) * len(shapes[key]), tuple(shapes[key]))]
        else:
            groups[target][pattern].append(key)
    converted = []
    for target, keys in groups.items():
        converter = by_pattern[next(iter(keys))]
        made = _blocks(converter, keys, shapes, target, meta[target]) if blocks else None
        if made is not None:
            pieces[target] = made
            continue
        sources = {key: pattern for pattern, group in keys.items() for key in group}
        outputs = [target.replace(converter.target_patterns[0], t) for t in converter.target_patterns]
        converted.append(Converted(deepcopy(converter), target, sources, outputs))
    provided = set(pieces) | {t for group in converted for t in group.targets}
    if missing := [name for name in params if name not in provided]:
        raise ValueError(f"{len(missing)} weight(s) of the model are missing, e.g. {missing[:3]}")
    return Layout({name: pieces[name] for name in params if name in pieces}, converted)


def written_pieces(layout: Layout, params: dict[str, tuple[int, ...]]) -> dict[str, list[Piece]]:
    """What an export writes for each parameter, in the files' layout that ``layout`` describes: its pieces, or for a
    parameter that transformers converts otherwise, the whole of it under its own name (which ``from_pretrained``
    loads as it is)."""
    converted = {name for group in layout.converted for name in group.targets}
    if converted:
        log.warning("%d weight(s) written under the model's own names (transformers converts them with %s), e.g. %s",
                    len(converted), layout.converted[0].converter.operations, sorted(converted)[:3])  # fmt: skip
    return {name: layout.pieces.get(name) or [Piece(name, (0,) * len(shape), shape)] for name, shape in params.items()}


def by_key(pieces: dict[str, list[Piece]]) -> dict[str, tuple[str, Piece]]:
    """File key -> (parameter, piece), in the order of ``pieces``."""
    return {piece.key: (name, piece) for name, group in pieces.items() for piece in group}


def piece_of(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The block ``piece`` of a (full) parameter, shaped as in the files."""
    block = tensor[tuple(slice(o, o + n) for o, n in zip(piece.offsets, piece.sizes, strict=True))]
    return block.reshape(piece.file_shape)
