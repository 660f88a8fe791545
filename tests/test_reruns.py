"""The workflow as a user runs it, in a copy of the real repository layout (Snakemake started in its root, its own
``vectorlm`` on the path): config files that stand alone, and reruns that follow content, not timestamps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, write_jsonl

pytestmark = pytest.mark.workflow

WORKFLOW = ["Snakefile", "rules", "workflow_scripts", "config", "profiles", "examples", "vectorlm"]
# A user's own config: it names no lr, warmup, weight decay or schedule, which the example config sets.
MINE = {
    "model": "models/tiny",
    "output_dir": "results/mine",
    "max_seq_len": 128,
    "data": {"train": "data/corpus.jsonl", "eval_fraction": 0.02},
    "train": {"max_steps": 4, "micro_batch_size": 2, "global_batch_size": 8, "eval_max_batches": 4},
    "export": {"smoke_test_prompt": "Once upon"},
}
EVERYTHING = {"tokenize", "pack", "link_data", "train", "consolidate", "convert_hf", "report", "all"}
FROM_TRAIN = EVERYTHING - {"tokenize", "pack", "link_data"}  # what a change of training reruns


def snakemake(repo: Path, *args: str, minutes: int = 5) -> subprocess.CompletedProcess:
    """Snakemake in the copy's root, as `.venv/bin/snakemake ...` in a checkout; SIGINT after ``minutes``."""
    command = ["timeout", "-s", "INT", "-k", "30", str(60 * minutes), sys.executable, "-m", "snakemake", "--cores", "2",
               *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, check=False)


def planned(repo: Path, *args: str) -> set[str]:
    result = snakemake(repo, "-n", *args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    if "Nothing to be done" in output:
        return set()
    table = output.split("Job stats:")[1].split("total")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip()}


def age(path: Path) -> None:
    """Gives ``path`` and everything under it a timestamp newer than every output, and keeps the content (what a git
    checkout, a copy or ``touch`` does)."""
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(entry, (time.time() + 10, time.time() + 10))


def copy_workflow(root: Path) -> None:
    """The repository's workflow (Snakefile, rules, scripts, configs, profiles, examples, the library) into ``root``."""
    for name in WORKFLOW:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_model_dir, corpus_rows):
    """A copy of the repository's workflow with a finished run of a user's config file."""
    root = tmp_path_factory.mktemp("repo")
    copy_workflow(root)
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    (root / "data").mkdir()
    # Above Snakemake's 1 MB checksum limit, so that only our fingerprints can tell a touched file from an edited one.
    write_jsonl(root / "data" / "corpus.jsonl", corpus_rows * 4)
    assert (root / "data" / "corpus.jsonl").stat().st_size > 10**6
    (root / "mine.yaml").write_text(yaml.safe_dump(MINE))
    result = snakemake(root, "--configfile=mine.yaml", "all")
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    return root


def test_a_config_file_stands_alone_with_documented_defaults(repo):
    resolved = yaml.safe_load((repo / "results" / "mine" / "hf_model" / "vectorlm_config.yaml").read_text())
    example = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    train = resolved["train"]
    assert (train["lr"], train["warmup_steps"], train["weight_decay"]) == (2.0e-5, 0, 0.0)  # docs/config.md
    assert (example["train"]["lr"], example["train"]["warmup_steps"]) == (2.0e-3, 20)  # what it used to inherit
    assert resolved["max_seq_len"] == 128 and train["max_steps"] == 4


def test_plain_snakemake_still_runs_the_embedded_default(repo):
    result = snakemake(repo, "-n")
    assert result.returncode == 0, result.stderr
    assert "results/tiny/tokenized" in result.stdout and "build_example" in result.stdout
    assert "results/mine" not in result.stdout


def test_several_config_files_merge_in_order(repo):
    (repo / "lr.yaml").write_text(yaml.safe_dump({"train": {"lr": 1.0e-3}}))  # not a whole experiment on its own
    assert planned(repo, "--configfile", "mine.yaml", "lr.yaml") == FROM_TRAIN
    assert planned(repo, "--configfile", "mine.yaml") == set()


def test_timestamps_alone_rerun_nothing(repo):
    for path in ("workflow_scripts", "vectorlm", "rules", "Snakefile", "models/tiny", "data/corpus.jsonl"):
        age(repo / path)
    assert planned(repo, "--configfile=mine.yaml") == set()


def test_a_performance_setting_reruns_nothing(repo):
    (repo / "batch.yaml").write_text(yaml.safe_dump({"data": {**MINE["data"], "tokenize_batch_size": 7}}))
    assert planned(repo, "--configfile", "mine.yaml", "batch.yaml") == set()


def edited(path: Path, change) -> bytes:
    """Applies ``change`` to the file's text; returns the original content."""
    original = path.read_bytes()
    path.write_text(change(path.read_text()))
    return original


CHANGES = [
    ("vectorlm/data/pack.py", lambda text: text + "\nREPEAT_WARNING = int(REPEAT_WARNING)\n", EVERYTHING - {"tokenize"}),
    ("vectorlm/data/chat.py", lambda text: text + "\n# a behaviour change would go here\n", EVERYTHING),
    ("vectorlm/packed.py", lambda text: text + "\n", EVERYTHING - {"tokenize"} | {"estimate"}),  # pack's and train's
    ("vectorlm/train/step.py", lambda text: text + "\n", FROM_TRAIN | {"estimate"}),  # which the estimate traces
    ("vectorlm/train/trainer.py", lambda text: text + "\n", FROM_TRAIN),  # started by name: its import counts
    ("vectorlm/export/consolidate.py", lambda text: text + "\n", {"consolidate", "convert_hf", "report", "all"}),
    ("vectorlm/pipeline/cache_keys.py", lambda text: text + "\n", set()),  # the workflow's own code: no stage's
    ("workflow_scripts/pack.py", lambda text: text + "\n", EVERYTHING - {"tokenize"}),
    ("data/corpus.jsonl", lambda text: text + json.dumps({"text": "One more story."}) + "\n", EVERYTHING),
    ("models/tiny/tokenizer_config.json", lambda text: text.replace("{", '{"model_max_length": 512, ', 1),
     EVERYTHING | {"estimate"}),
    ("models/tiny/config.json", lambda text: text.replace("{", '{"note": "edited", ', 1), EVERYTHING | {"estimate"}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "change", "expected"), CHANGES, ids=[c[0] for c in CHANGES])
def test_a_content_change_reruns_the_stages_that_read_it(repo, path, change, expected):
    original = edited(repo / path, change)
    try:
        assert planned(repo, "--configfile=mine.yaml") == expected
    finally:
        (repo / path).write_bytes(original)
    assert planned(repo, "--configfile=mine.yaml") == set()  # content back: nothing to do, whatever the timestamps


def test_changed_weights_rerun_training_not_tokenization(repo):
    weights = repo / "models" / "tiny" / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    try:
        assert planned(repo, "--configfile=mine.yaml") == FROM_TRAIN
    finally:
        weights.write_bytes(original)
    assert planned(repo, "--configfile=mine.yaml") == set()


def test_numbers_written_the_way_users_write_them(repo):
    (repo / "lr.yaml").write_text("train:\n  lr: 1e-4\n")  # YAML 1.1 reads 1e-4 as a string
    assert planned(repo, "--configfile", "mine.yaml", "lr.yaml") == FROM_TRAIN


def start(repo: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.Popen(command, cwd=repo, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, f"no {what}"
        time.sleep(0.001)


def test_the_same_command_continues_after_any_interruption(repo):
    """A hard kill while tokenize writes its scratch files, then Ctrl-C as soon as pack's output appears: both times
    the same command (after --unlock for the hard kill) finishes the run, and no scratch files stay behind."""
    # Another eval split than mine's: its own cache entries, so that tokenize and pack run.
    again = {**MINE, "output_dir": "results/again", "data": {**MINE["data"], "eval_fraction": 0.03}}
    (repo / "again.yaml").write_text(yaml.safe_dump(again))
    out, cache = repo / "results" / "again", repo / "results" / "cache"

    process = start(repo, "--configfile=again.yaml", "pack")
    wait_for(lambda: any(cache.glob("tokenized/.*.partial/*.arrow")), process, "tokenize scratch files")
    [scratch] = cache.glob("tokenized/.*.partial")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert scratch.is_dir()  # what a killed stage leaves
    assert snakemake(repo, "--configfile=again.yaml", "--unlock").returncode == 0

    before = set(cache.glob("packed/*"))  # other experiments' entries
    process = start(repo, "--configfile=again.yaml", "pack")
    wait_for(lambda: set(cache.glob("packed/*")) - before, process, "packed output")
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: Snakemake and its job
    process.wait(timeout=120)
    assert planned(repo, "--configfile=again.yaml", "pack") == {"pack"}  # it was stopped before it finished

    result = snakemake(repo, "--configfile=again.yaml", "pack")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert planned(repo, "--configfile=again.yaml", "link_data") == {"link_data"}  # pack's target is its cache entry
    assert snakemake(repo, "--configfile=again.yaml", "link_data").returncode == 0
    assert (out / "tokenized" / "corpus" / "stats.json").is_file() and (out / "packed" / "stats.json").is_file()
    assert not scratch.exists() and not list(cache.glob("packed/.*.partial"))
    assert planned(repo, "--configfile=again.yaml", "pack") == set()


def test_a_mixture_is_tokenized_per_source_and_weighted_in_pack(repo, corpus_rows):
    """Three sources, weights 0.6/0.3/0.1: a tokenize job each, the realised shares of training tokens within a
    percentage point of the weights; a new weight repacks, and tokenizes nothing."""
    rows = corpus_rows * 2
    for name, part in (("web", rows[:500]), ("books", rows[500:700]), ("code", rows[700:760])):
        write_jsonl(repo / "data" / f"{name}.jsonl", part)
    weights = {"web": 0.6, "books": 0.3, "code": 0.1}
    sources = [{"path": f"data/{name}.jsonl", "weight": weight} for name, weight in weights.items()]
    mixed = {**MINE, "output_dir": "results/mixed", "data": {"train": sources, "eval_fraction": 0.05}}
    (repo / "mixed.yaml").write_text(yaml.safe_dump(mixed))
    result = snakemake(repo, "--configfile=mixed.yaml", "link_data")
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert result.stderr.count("rule tokenize:") == 3
    stats = json.loads((repo / "results" / "mixed" / "packed" / "stats.json").read_text())
    for name, weight in weights.items():
        assert stats["sources"][name]["share"] == pytest.approx(weight, abs=0.01), stats["sources"]
    assert stats["sources"]["code"]["times_repeated"] > 1 > stats["sources"]["web"]["times_repeated"]
    assert {p.name for p in (repo / "results" / "mixed" / "tokenized").glob("[!.]*")} == set(weights)
    resolved = yaml.safe_load((repo / "results" / "mixed" / "packed" / "vectorlm_config.yaml").read_text())
    assert resolved["data"]["train"] == sources  # the mixture as written, reloadable

    sources[2]["weight"] = 0.2
    (repo / "mixed.yaml").write_text(yaml.safe_dump(mixed))
    assert planned(repo, "--configfile=mixed.yaml") == EVERYTHING - {"tokenize"} | {"estimate"}  # it ran to link_data


def test_experiments_with_the_same_data_settings_share_tokenization(repo):
    """Same data, tokenizer and tokenize settings in another output_dir: no tokenize, no pack; another field or
    another tokenizer: tokenize."""
    rows = [json.loads(line) for line in (repo / "data" / "corpus.jsonl").read_text().splitlines()[:300]]
    write_jsonl(repo / "data" / "two.jsonl", [{"text": r["text"], "body": r["text"].upper()} for r in rows])
    if not (repo / "models" / "other").exists():
        shutil.copytree(repo / "models" / "tiny", repo / "models" / "other")  # the same tokenizer, elsewhere

    def experiment(name, **data):
        config = {**MINE, "output_dir": f"results/{name}", "data": {"train": "data/two.jsonl", **data}}
        if name == "other-tokenizer":
            config["model"] = "models/other"
        (repo / f"{name}.yaml").write_text(yaml.safe_dump(config))
        return f"--configfile={name}.yaml"

    first = snakemake(repo, experiment("first"), "link_data")
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    assert planned(repo, experiment("second")) == FROM_TRAIN | {"link_data", "estimate"}
    assert planned(repo, experiment("body", text_field="body")) == EVERYTHING | {"estimate"}
    assert planned(repo, experiment("other-tokenizer")) == EVERYTHING | {"estimate"}
    second = repo / "results" / "second"
    assert snakemake(repo, experiment("second"), "link_data").returncode == 0
    assert (second / "packed" / "stats.json").resolve() == (
        repo / "results" / "first" / "packed" / "stats.json"
    ).resolve()
    assert (second / "tokenized" / "two").resolve().parent == repo.resolve() / "results" / "cache" / "tokenized"


def test_the_embedded_default_runs_whole_and_its_trained_model_beats_the_base_on_the_shipped_task(repo):
    """What `make run` does: plain `snakemake all`, the shipped config, nothing downloaded, evaluation included. On
    the shipped task (held-out stories: pick the ending with the hero's name among four; chance is 0.25) the trained
    model scores far above the untrained one. Last in this module: it runs the embedded default."""
    result = snakemake(repo, "all", minutes=15)  # ~4.5 minutes on 2 cores (make run)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    out = repo / "results" / "tiny" / "evaluate"
    trained = json.loads((out / "results.json").read_text())["results"]["tiny_stories_cloze"]
    base = json.loads((out / "base" / "results.json").read_text())["results"]["tiny_stories_cloze"]
    assert trained["sample_len"] == base["sample_len"] == 200
    assert base["acc,none"] < 0.4 and trained["acc,none"] > base["acc,none"] + 0.3, (base, trained)
    print(f"tiny_stories_cloze acc: base {base['acc,none']:.4f}, trained {trained['acc,none']:.4f}")
    assert f"tiny_stories_cloze acc,none {base['acc,none']:.4f} (base) -> {trained['acc,none']:.4f} (trained)" in (
        result.stdout + result.stderr
    )
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in generations] == yaml.safe_load((repo / "config" / "config.yaml").read_text())[
        "evaluate"
    ]["prompts"]
    assert all(g["generation"].strip() for g in generations)
