"""Content fingerprints of what a workflow stage depends on: the code it runs, its input data, the model files it reads.

Each rule gets these as ``params`` (:class:`StageFingerprints`); Snakemake reruns a job whose params changed since it
last ran, so a stage reruns exactly when the content of what it reads changes, and a timestamp that moves (a ``git
checkout``, a copy, ``touch``) changes nothing. For that, the workflow profile turns off Snakemake's timestamp-based
code trigger and external inputs are marked ``ancient()`` (rules/common.smk).

- Code: the stage's workflow script and every module of the ``vectorlm`` package it imports, directly or not (found by
  reading their imports), by content. Third-party libraries are not included: upgrading one reruns nothing. So module
  boundaries decide what reruns: the stage packages never import this one (vectorlm/pipeline/), and what two stages
  share sits on a floor below both.
- Files: by content, except weight files (``.safetensors``) above :data:`SAMPLE_ABOVE`: their size, safetensors
  header and :data:`SAMPLE_BLOCKS` blocks spread evenly over the file, which any retraining or replacement changes
  (an edit of a few bytes between two blocks would go unseen; ``--forcerun`` reruns anyway).
- Each file's digest is cached under its path, size, inode and modification time
  (``.snakemake/vectorlm-fingerprints.json`` where Snakemake runs), so a file is read again only after it changed or
  moved: a dry run stays fast, and a touched file is re-read once and found unchanged.

Standard library only: the Snakefile imports this when it builds the DAG.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SAMPLE_ABOVE = 256 * 2**20
SAMPLE_BLOCKS = 64
BLOCK = 64 * 2**10
WEIGHT_SUFFIXES = (".safetensors",)
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # vectorlm/


class FileDigests:
    """Content digests of files, cached under (size, inode, mtime); :meth:`save` writes the cache back."""

    def __init__(self, cache_path: str | Path) -> None:
        self.cache_path = Path(cache_path)
        try:
            self.cache = json.loads(self.cache_path.read_text())
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
        if self.changed:
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


def imported_modules(source: Path, package_dir: Path = PACKAGE_DIR) -> set[Path]:
    """The modules of the package in ``package_dir`` that ``source`` imports, directly or through one another."""
    found, pending = set(), [source]
    while pending:
        for module in _direct_imports(pending.pop(), package_dir):
            if module not in found:
                found.add(module)
                pending.append(module)
    return found


# Import statements naming a package module (``import p.a``, ``from p.a import b, c``, parenthesised over lines);
# read with a regular expression, 10x faster than parsing (an import quoted in a docstring counts too: harmless).
_IMPORT = re.compile(
    r"^[ \t]*(?:import[ \t]+([\w.]+)|from[ \t]+([\w.]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*))", re.MULTILINE
)


@functools.cache
def _direct_imports(source: Path, package_dir: Path) -> tuple[Path, ...]:
    """The package modules ``source`` imports itself (anywhere in it: imports inside functions run too)."""
    package, modules = package_dir.name, []
    for imported, origin, names in _IMPORT.findall(source.read_text()):
        module = imported or origin
        if module.split(".")[0] != package:
            continue
        candidates = [module] + [f"{module}.{n.split()[0]}" for n in re.split(r"[,\s()]+", names) if n and n != "as"]
        for parts in (name.split(".") for name in candidates):
            for depth in range(1, len(parts) + 1):  # a package's __init__ runs for every module below it
                base = package_dir.joinpath(*parts[1:depth])
                modules += [c for c in (base / "__init__.py", base.with_suffix(".py")) if c.is_file()]
    return tuple(dict.fromkeys(modules))


def code_digest(script: str | Path, package_dir: Path = PACKAGE_DIR) -> str:
    """The digest of a workflow script and the package modules it runs, by content."""
    script = Path(script)
    sha = hashlib.blake2b(digest_size=16)
    for path in [script, *sorted(imported_modules(script, package_dir))]:
        name = path.relative_to(package_dir.parent).as_posix() if path != script else script.name
        sha.update(f"{name}\0".encode() + path.read_bytes() + b"\n")
    return sha.hexdigest()


def settings_digest(settings: Any) -> str:
    """A short digest of ``settings`` (plain JSON values), e.g. the name of a cache entry."""
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()


def built_model_digests(digests: FileDigests, *, script: Path, corpus: str | Path, sizes: dict[str, int]) -> dict:
    """What stands for the files of the model the workflow builds (the example model, which does not exist before its
    rule runs): a digest of what it is built from, the rule's ``script`` with its code, the ``corpus`` and the
    ``sizes``."""
    recipe = {"code": code_digest(script), "corpus": tree_digest(digests, corpus), "sizes": sizes}
    return dict.fromkeys(("files", "weights"), f"made by build_example {settings_digest(recipe)}")


class StageFingerprints:
    """What each rule's params carry: the digests of its workflow script with the package code it runs, of its
    ``data`` files ({role: path}) and of the parts of the base model it reads (``files`` and/or ``weights``).

    Args:
        scripts: the workflow's ``workflow_scripts`` directory.
        digests: the file digests (cached, written back after each call).
        model: the base model's digests (:func:`model_digests`, or :func:`built_model_digests`).
    """

    def __init__(self, scripts: str | Path, *, digests: FileDigests, model: dict[str, str]) -> None:
        self.scripts, self.digests, self.model = Path(scripts), digests, model

    def __call__(self, script: str, *, data: dict[str, str] | None = None, model: Iterable[str] = ()) -> dict[str, str]:
        fingerprint = {"code": code_digest(self.scripts / script)}
        fingerprint.update({f"data {role}": tree_digest(self.digests, path) for role, path in (data or {}).items()})
        fingerprint.update({f"model {part}": self.model[part] for part in model})
        self.digests.save()
        return fingerprint
