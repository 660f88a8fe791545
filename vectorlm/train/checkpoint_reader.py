"""Reading a training checkpoint's DCP files without running anything they hold.

DCP unpickles a checkpoint's ``.metadata`` and reads its non-tensor entries with ``torch.load(weights_only=False)``,
so a crafted checkpoint could run code when it is resumed or consolidated. Here ``.metadata`` is unpickled with DCP's
metadata classes only, every entry must be a tensor, and every data file must lie inside the checkpoint.
"""

from __future__ import annotations

import io
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
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a checkpoint's .metadata")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint whose metadata would make DCP unpickle something other than tensors."""


def read_metadata_file(path: Path) -> Metadata:
    """``path``'s DCP metadata, unpickled with only DCP's metadata classes, and holding tensor entries only.

    Raises:
        UnsafeCheckpointError: an entry of another kind (DCP would read it with ``torch.load(weights_only=False)``).
        pickle.UnpicklingError: anything but DCP's metadata classes in the file.
    """
    with open(path, "rb") as f:
        metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{path} does not hold DCP metadata")
    for name, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise UnsafeCheckpointError(
                f"{path}: entry {name!r} is a {type(entry).__name__}, not a tensor; checkpoints are read only when "
                "every entry is a tensor, since DCP unpickles other entries without weights_only"
            )
    for info in (metadata.storage_data or {}).values():
        relative = Path(getattr(info, "relative_path", ""))
        if relative.is_absolute() or ".." in relative.parts:
            raise UnsafeCheckpointError(f"{path}: a data file lies outside the checkpoint ({relative})")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, safe against crafted checkpoints (:func:`read_metadata_file`), reading ``.metadata`` once.

    DCP's own reader reads and unpickles ``.metadata`` on every ``dcp.load``: about 4 s for a 70B checkpoint written
    by 64 ranks, which consolidation, loading a few tensors per call, would pay thousands of times.
    """

    _metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = read_metadata_file(Path(self.path) / ".metadata")
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata
