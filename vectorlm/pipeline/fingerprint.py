"""Content fingerprints of what a workflow stage depends on: the code it runs, its input data, the model files it reads.

Each rule gets these as ``params`` (:class:`StageFingerprints`); Snakemake reruns a job whose params changed since it
last ran, so a stage reruns exactly when the content of what it reads changes, and a timestamp that moves (a ``git
checkout``, a copy, ``touch``) changes nothing. For that, the workflow profile turns off Snakemake's timestamp-based
code trigger and external inputs are marked ``ancient()`` (rules/common.smk).

- Code: the stage's workflow script and every module of the ``vectorlm`` package it imports, directly or not (found by
  reading their imports), by content. Third-party libraries are not included: upgrading one reruns nothing. So module
  boundaries decide what reruns: the stage packages never import this one (vectorlm/pipeline/), and what two stages
  share sits on a floor below both.
- Files: by content (vectorlm/file_digests.py, which training uses too), cached in
  ``.snakemake/vectorlm-fingerprints.json`` where Snakemake runs, so that a dry run stays fast.

Standard library only: the Snakefile imports this when it builds the DAG.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vectorlm.file_digests import FileDigests, tree_digest

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # vectorlm/


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
