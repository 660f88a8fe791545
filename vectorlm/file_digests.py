"""Content digests of files: data, tokenizers, model weights. The workflow's fingerprints use them to rerun exactly
what reads a changed file (vectorlm/pipeline/fingerprint.py), and training to refuse resuming a run whose base
weights changed (vectorlm/train/resume.py): both compute the same digest of the same files.

- Files are digested by content, except weight files (``.safetensors``) above :data:`SAMPLE_ABOVE`: their size,
  safetensors header and :data:`SAMPLE_BLOCKS` blocks spread evenly over the file, which any retraining or
  replacement changes (an edit of a few bytes between two blocks would go unseen; ``--forcerun`` reruns anyway). So a
  70B model's weights are digested in about a second, not minutes.
- Each file's digest can be cached under its path, size, inode and modification time, so a file is read again only
  after it changed or moved: a touched file is re-read once and found unchanged.

Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

SAMPLE_ABOVE = 256 * 2**20
SAMPLE_BLOCKS = 64
BLOCK = 64 * 2**10
WEIGHT_SUFFIXES = (".safetensors",)


class FileDigests:
    """Content digests of files, cached under (size, inode, mtime); :meth:`save` writes the cache back."""

    def __init__(self, cache_path: str | Path | None = None) -> None:
        self.cache_path = Path(cache_path) if cache_path is not None else None  # None: digests kept in memory only
        try:
            self.cache = json.loads(self.cache_path.read_text()) if self.cache_path else {}
        except (OSError, ValueError):
            self.cache = {}
        self.changed = False

    def digest(self, path: Path) -> str:
        stat = path.stat()
        key, stamp = str(path.resolve()), [stat.st_size, stat.st_ino, stat.st_mtime_ns]
        cached = self.cache.get(key)
        if cached is not None and cached[:3] == stamp:
            return cached[3]
        value = _file_digest(path, stat.st_size)
        self.cache[key] = [*stamp, value]
        self.changed = True
        return value

    def save(self) -> None:
        if self.changed and self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.cache_path.with_name(f".{self.cache_path.name}.{os.getpid()}")
            partial.write_text(json.dumps(self.cache))
            partial.replace(self.cache_path)  # atomic: concurrent Snakemake processes never read half a file
            self.changed = False


def _file_digest(path: Path, size: int) -> str:
    sha = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if path.suffix in WEIGHT_SUFFIXES and size > SAMPLE_ABOVE:
            sha.update(size.to_bytes(8, "little"))
            header_length = int.from_bytes(f.read(8), "little")
            sha.update(f.read(min(header_length, size)))
            for index in range(SAMPLE_BLOCKS):
                f.seek(index * (size - BLOCK) // (SAMPLE_BLOCKS - 1))
                sha.update(f.read(BLOCK))
        else:
            while chunk := f.read(2**20):
                sha.update(chunk)
    return sha.hexdigest()


def files_under(path: Path) -> list[Path]:
    """``path`` itself, or the files below a directory, hidden ones (``.git``, ``.cache``, ...) left out."""
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def tree_digest(digests: FileDigests, root: str | Path, files: Iterable[Path] | None = None) -> str:
    """One digest for ``files`` (default: all under ``root``), by their paths relative to ``root`` and contents;
    "absent" when ``root`` does not exist."""
    root = Path(root)
    if not root.exists():
        return "absent"
    sha = hashlib.blake2b(digest_size=16)
    for file in files if files is not None else files_under(root):
        relative = file.relative_to(root).as_posix() if file != root else file.name
        sha.update(f"{relative}\0{digests.digest(file)}\n".encode())
    return sha.hexdigest()


def model_digests(digests: FileDigests, model_dir: str | Path) -> dict[str, str]:
    """The model directory in two parts: ``weights`` (safetensors files and their index) and ``files`` (everything
    else: config, tokenizer, generation config, custom code), so that stages which never read the weights do not
    rerun when only they change."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {"files": "absent", "weights": "absent"}
    every = files_under(model_dir)
    weights = [p for p in every if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".safetensors.index.json")]
    others = [p for p in every if p not in weights]
    return {"files": tree_digest(digests, model_dir, others), "weights": tree_digest(digests, model_dir, weights)}
