"""Reading a training checkpoint's DCP files without running anything they hold or reading more than they should.

DCP unpickles a checkpoint's ``.metadata`` and reads its non-tensor entries with ``torch.load(weights_only=False)``,
so a crafted checkpoint could run code when it is resumed or consolidated; and a stored item may declare a
decompression transform, which would expand a few bytes into gigabytes. Here ``.metadata`` is unpickled with DCP's
metadata classes only, every entry must be a tensor, every data file must lie inside the checkpoint, no item may
declare a transform (vectorlm writes none), and no item may be longer than the tensor block it holds.

A checkpoint that fails these checks, or cannot be read here for another reason (permission, I/O, a version this
code does not know) is :class:`CheckpointUnreadable`: training stops with the reason and touches it not.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and refuses any global outside its known, inert classes."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("pathlib", "PosixPath"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        *(("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "StorageMeta", "MetadataIndex", "TensorProperties", "TensorStorageMetadata",
            # Inert to unpickle; read_metadata_file then refuses the checkpoint, naming the entry.
            "ChunkStorageMetadata", "BytesStorageMetadata",
        )),
    }  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refusing to unpickle {module}.{name} from a checkpoint's .metadata")


class CheckpointUnreadable(Exception):
    """A checkpoint that cannot be read here (refused content, permission or I/O errors, a version this code does not
    read), as opposed to a damaged one (a partial write): the run stops naming it, and nothing is moved or removed."""


class UnsafeCheckpointError(CheckpointUnreadable, pickle.UnpicklingError):
    """A checkpoint whose files would make DCP unpickle something other than tensors, read outside the checkpoint, or
    expand data."""


# What reading a checkpoint's file raises when the file is not there (a partial write: damage, not a refusal).
MISSING_FILE = (FileNotFoundError, IsADirectoryError, NotADirectoryError)

# Bytes a stored item may hold beyond its tensor's data: torch.save's zip records (measured: about 1.6 KB).
ITEM_OVERHEAD_BYTES = 64 * 2**10


def read_metadata_file(path: Path) -> Metadata:
    """``path``'s DCP metadata, unpickled with only DCP's metadata classes, and holding tensor entries only.

    Raises:
        UnsafeCheckpointError: a class other than DCP's metadata classes in the file; an entry of another kind than a
            tensor (DCP would read it with ``torch.load(weights_only=False)``); a data file outside the checkpoint; a
            stored item that declares a transform, or is longer than its tensor block.
        pickle.UnpicklingError, EOFError: a file that is not DCP metadata (damaged).
    """
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        except UnsafeCheckpointError as error:  # named by the file (another torch version's classes, or a crafted one)
            raise UnsafeCheckpointError(f"{path}: {error}") from None
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{path} does not hold DCP metadata")
    for name, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise UnsafeCheckpointError(
                f"{path}: entry {name!r} is a {type(entry).__name__}, not a tensor; checkpoints are read only when "
                "every entry is a tensor, since DCP unpickles other entries without weights_only"
            )
    for index, info in (metadata.storage_data or {}).items():
        relative = Path(getattr(info, "relative_path", ""))
        if relative.is_absolute() or ".." in relative.parts:
            raise UnsafeCheckpointError(f"{path}: a data file lies outside the checkpoint ({relative})")
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{path}: the item of {index.fqn!r} in {relative} declares the transforms "
                                        f"{info.transform_descriptors}; vectorlm writes none and reads none")  # fmt: skip
        limit = _block_bytes(metadata, index) + ITEM_OVERHEAD_BYTES
        if info.length > limit:
            raise UnsafeCheckpointError(f"{path}: the item of {index.fqn!r} in {relative} is {info.length:,} bytes, "
                                        f"more than its tensor block can take ({limit:,})")  # fmt: skip
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def check_entries(path: Path) -> None:
    """Refuses anything in the checkpoint ``path`` that is not a regular file or directory of its own: a symbolic
    link (to another checkpoint's file, say, which would be mixed in), a FIFO (which would block a reader forever), a
    device.

    Raises:
        UnsafeCheckpointError: naming the entry.
    """
    if path.is_symlink():
        raise UnsafeCheckpointError(f"{path} is a symbolic link; a checkpoint is read only from a directory of its own")
    for entry in path.rglob("*"):
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            kind = "a symbolic link" if entry.is_symlink() else "not a regular file"
            raise UnsafeCheckpointError(f"{entry} is {kind}; a checkpoint holds only files of its own")


def _block_bytes(metadata: Metadata, index) -> int:
    """The bytes of the tensor block a stored item holds (its chunk's size at ``index.offset``), or 0 when there is
    no such chunk."""
    entry = metadata.state_dict_metadata.get(index.fqn)
    if entry is None:
        return 0
    for chunk in entry.chunks:
        if tuple(chunk.offsets) == tuple(index.offset or ()):
            return math.prod(chunk.sizes) * entry.properties.dtype.itemsize
    return 0


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, safe against crafted checkpoints (:func:`read_metadata_file`), reading ``.metadata`` once.

    DCP's own reader reads and unpickles ``.metadata`` on every ``dcp.load``: about 4 s for a 70B checkpoint written
    by 64 ranks, which consolidation, loading a few tensors per call, would pay thousands of times.
    """

    _metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            check_entries(Path(self.path))
            self._metadata = read_metadata_file(Path(self.path) / ".metadata")
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata
