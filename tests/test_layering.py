"""The shape of vectorlm/ as rules a change cannot break unnoticed: a package per stage on floors, each importing only
from the floors below it; no import circle; the workflow's own package (vectorlm/pipeline/) imported by the Snakefile
alone and free of torch, transformers and datasets; workflow scripts that are adapters of a few lines.

Module boundaries decide what reruns (a stage's code digest follows its imports: vectorlm/pipeline/fingerprint.py),
so these rules are also what keeps an edit of one stage's code from rerunning another.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "vectorlm"
# The modules outside subpackages are the ground floor that every side may import: the config, its schema, logging,
# the run directory's layout, what pack and train agree on about packed rows, and content digests of files.
GROUND = {
    "vectorlm",
    "vectorlm.config",
    "vectorlm.config_schema",
    "vectorlm.log",
    "vectorlm.run_dir",
    "vectorlm.packed",
    "vectorlm.file_digests",
}
FLOORS = {
    "ground": 0,
    "hub": 1,  # the Hugging Face model directory, as training and export read and write it
    "example": 1,  # the embedded example's model (rule build_example)
    "data": 2,  # tokenize, pack, link_data, and the batches training reads
    "train": 3,
    "export": 4,  # consolidate, convert_hf (read training's checkpoints and LoRA format)
    "evaluate": 4,
    "estimate": 4,  # rule estimate: a training step traced on fake tensors (builds the model as training does)
    "report": 5,  # the run's report, compare (read training's metrics and the estimate)
    "pipeline": 6,  # what the Snakefile imports: preflight checks, fingerprints, cache keys, the summary
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    return "ground" if module in GROUND else module.split(".")[1]


def vectorlm_imports(path: Path) -> set[str]:
    """The vectorlm modules ``path`` imports, anywhere in it (imports inside functions run too)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    return {name for name in imported if name in modules and name.startswith("vectorlm")}


def graph() -> dict[str, set[str]]:
    return {module_name(path): vectorlm_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_lives_on_a_known_floor():
    assert {package_of(module) for module in graph()} <= set(FLOORS), {package_of(m) for m in graph()} - set(FLOORS)


def test_no_import_runs_back_up_a_floor():
    """A module imports from its own package or from packages on lower floors only: the stage packages never import
    vectorlm/pipeline/, export never training's loop, training never export."""
    upward = [
        f"{module} ({package_of(module)}) imports {target} ({package_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if package_of(target) != package_of(module) and FLOORS[package_of(target)] >= FLOORS[package_of(module)]
    ]
    assert not upward, "\n".join(upward)
    assert not [m for m, targets in graph().items() if package_of(m) != "pipeline" and any(
        package_of(t) == "pipeline" for t in targets)]  # fmt: skip


def test_no_import_circle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in edges:
        if module not in state:
            visit(module, [])


def snakefile_imports() -> set[str]:
    """The vectorlm modules the Snakefile and the rules import."""
    imported = set()
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["from"], ["import"]) and len(words) > 1 and words[1].startswith("vectorlm"):
                imported.add(words[1])
    return imported


def test_the_snakefile_imports_the_pipeline_and_the_ground_floor_only_and_no_heavy_library():
    """What runs on every Snakemake call, dry runs included: vectorlm/pipeline/ (and the config and layout it shares
    with the stages), without torch, transformers or datasets (seconds of imports, and a GPU library on a login
    node). Every module of vectorlm/pipeline/ is there for the Snakefile."""
    imported = snakefile_imports()
    assert imported and all(package_of(m) in ("pipeline", "ground") for m in imported), imported
    probe = "import importlib, json, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in sorted(imported))
    probe += "print(json.dumps(sorted(sys.modules)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                                           check=True).stdout))  # fmt: skip
    assert not {"torch", "transformers", "datasets"} & loaded, {"torch", "transformers", "datasets"} & loaded
    pipeline = {m for m in graph() if package_of(m) == "pipeline" and m != "vectorlm.pipeline"}
    assert pipeline <= loaded, f"not used by the Snakefile: {pipeline - loaded}"


def test_workflow_scripts_are_adapters_of_a_few_lines():
    """Each unpacks snakemake's inputs, outputs, params and log and calls one stage's package (plus the ground floor)."""
    for script in sorted((REPO / "workflow_scripts").glob("*.py")):
        lines = [line for line in script.read_text().splitlines() if line.strip()]
        assert len(lines) <= 25, f"{script.name}: {len(lines)} lines"
        stages = {package_of(m) for m in vectorlm_imports(script)} - {"ground"}
        assert len(stages) == 1, f"{script.name} calls into {stages}"


def test_subpackages_have_empty_init_files():
    inits = [path for path in PACKAGE.glob("*/__init__.py")]
    assert inits and all(not path.read_text().strip() for path in inits), [p for p in inits if p.read_text().strip()]
