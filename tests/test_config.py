import dataclasses
from pathlib import Path

import pytest
import yaml

from vectorlm.config import (
    SIZE_UNITS,
    Config,
    ConfigError,
    DataConfig,
    EstimateConfig,
    EvaluateConfig,
    ExportConfig,
    LoraSettings,
    TrainConfig,
    load_config,
    parse_size,
)
from vectorlm.config import (
    main as config_main,
)
from vectorlm.config_schema import OPERATIONAL_KEYS, rerun_stage, schema, section_properties

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"model": "m", "output_dir": "o", "max_seq_len": 64, "data": {"train": "t.jsonl"}}


def with_(section: str, **values) -> dict:
    raw = {**MINIMAL, section: {**MINIMAL.get(section, {}), **values}}
    return raw


@pytest.mark.parametrize("path", sorted((REPO / "config").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.max_seq_len > 0


@pytest.mark.parametrize(
    ("section", "cls"),
    [
        ("data", DataConfig),
        ("train", TrainConfig),
        ("export", ExportConfig),
        ("lora", LoraSettings),
        ("evaluate", EvaluateConfig),
    ],
)
def test_schema_defaults_equal_dataclass_defaults(section, cls):
    properties = schema()["properties"][section]["properties"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(properties) == set(fields)
    for name, prop in properties.items():
        if "default" in prop:
            default = fields[name].default
            assert (list(default) if isinstance(default, tuple) else default) == prop["default"], name


def test_docs_describe_every_key():
    docs = (REPO / "docs" / "config.md").read_text()

    def keys(props, prefix=""):
        for name, prop in props.items():
            yield prefix + name
            yield from keys(prop.get("properties", {}), f"{prefix}{name}.")

    missing = [k for k in keys(schema()["properties"]) if f"`{k}`" not in docs]
    assert not missing, f"docs/config.md lacks {missing}"


def documented_keys() -> dict[str, list[str]]:
    """docs/config.md's key tables: {key: [type, default, reruns, meaning]}."""
    rows = [
        line.split(" | ") for line in (REPO / "docs" / "config.md").read_text().splitlines() if line.startswith("| `")
    ]
    return {cells[0].strip("| `"): cells[1:] for cells in rows if len(cells) == 5}


def leaf_keys() -> dict[str, tuple[str | None, str]]:
    """{dotted key: (section, key)} of every key of the schema that is not a section."""
    return {(f"{section}.{key}" if section else key): (section, key)
            for section in (None, *SECTIONS)
            for key, prop in section_properties(section).items() if "properties" not in prop}  # fmt: skip


SECTIONS = ("data", "train", "lora", "dpo", "export", "estimate", "evaluate", "sweep")


def test_every_key_states_its_role_once_and_the_docs_agree():
    """The schema's x-reruns of each key is what docs/config.md's "reruns" column says, and its default is the
    documented one: the roles (and OPERATIONAL_KEYS, which comes from them) are written once."""
    documented = documented_keys()
    assert set(documented) == set(leaf_keys()), set(documented) ^ set(leaf_keys())
    for name, (section, key) in leaf_keys().items():
        prop = section_properties(section)[key]
        _, default, reruns, _ = documented[name]
        assert reruns == prop["x-reruns"] == rerun_stage(section, key), name
        if "default" in prop:
            assert _documented_value(default) == prop["default"], (name, default)
        else:
            assert default == "required", name
    nothing = {name: leaf_keys()[name] for name, cells in documented.items() if cells[2] == "nothing"}
    assert {f"{section}.{key}" for section, keys in OPERATIONAL_KEYS.items() for key in keys} == set(nothing)


def _documented_value(text: str):
    value = yaml.safe_load(text.strip("`"))
    if isinstance(value, str):
        try:
            return float(value)  # 2e-5: YAML 1.1 reads a string
        except ValueError:
            return value
    return value


def test_the_resume_rules_in_the_docs_are_the_schemas():
    """docs/config.md's resuming table lists the settings a finished run may change, and the tracking section those a
    resumed run may change and still repeat its steps: both as the schema's x-resume and x-reruns say."""
    from vectorlm.train.resume import FREE_ON_RESUME, SCHEDULE_ONLY

    docs = (REPO / "docs" / "config.md").read_text()
    finished = docs.split("| finished run | same settings (only ")[1].split(" may differ)")[0]
    named = {name.strip("`").removeprefix("train.") for name in finished.split(", ")}
    assert named == FREE_ON_RESUME, named ^ FREE_ON_RESUME
    assert SCHEDULE_ONLY == FREE_ON_RESUME | {"max_steps", "num_epochs"}


def test_defaults_are_filled():
    config = Config.from_dict(MINIMAL)
    assert config.train == TrainConfig()
    assert config.data.text_field == "text"
    assert config.export.max_shard_bytes == 5 * 10**9


def test_unknown_key_is_named_with_its_section():
    with pytest.raises(ConfigError, match=r"unknown config key train\.learning_rate"):
        Config.from_dict(with_("train", learning_rate=1e-4))


def test_unknown_top_level_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown config key max_seq_length \(did you mean max_seq_len\?"):
        Config.from_dict({**MINIMAL, "max_seq_length": 12})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"config key train\.lr: 'fast' is not of type 'number'"):
        Config.from_dict(with_("train", lr="fast"))


def test_missing_required_key():
    raw = dict(MINIMAL)
    del raw["max_seq_len"]
    with pytest.raises(ConfigError, match="missing config key 'max_seq_len'"):
        Config.from_dict(raw)


def test_invalid_enum_value():
    with pytest.raises(ConfigError, match=r"config key train\.sharding: 'zero3' is not one of"):
        Config.from_dict(with_("train", sharding="zero3"))


def test_global_batch_must_be_multiple_of_micro_batch():
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(10\) must be a multiple of"):
        TrainConfig(global_batch_size=10, micro_batch_size=4)


def test_gradient_accumulation_from_world_size():
    cfg = TrainConfig(global_batch_size=32, micro_batch_size=4)
    assert cfg.grad_accumulation_steps(1) == 8
    assert cfg.grad_accumulation_steps(4) == 2
    assert cfg.grad_accumulation_steps(8) == 1
    with pytest.raises(ConfigError, match=r"divisible by train\.micro_batch_size \(4\) x world size \(3\) = 12"):
        cfg.grad_accumulation_steps(3)


def test_warmup_must_end_before_training():
    with pytest.raises(ConfigError, match=r"train\.warmup_steps \(10\) must be below train\.max_steps \(10\)"):
        TrainConfig(max_steps=10, warmup_steps=10)


def test_size_parsing():
    assert parse_size("500MB", key="k") == 500 * 10**6
    assert parse_size("2GiB", key="k") == 2 * 2**30
    assert parse_size("1.5TB", key="k") == 1.5 * 10**12
    with pytest.raises(ConfigError, match="export.max_shard_size: cannot read size 'lots'"):
        ExportConfig(max_shard_size="lots")
    with pytest.raises(ConfigError, match="export.smoke_test_max_size: cannot read size '8 GB'"):
        ExportConfig(smoke_test_max_size="8 GB")
    for unit in SIZE_UNITS:  # the schema's pattern accepts every unit parse_size reads
        assert ExportConfig(max_shard_size=f"2{unit}", smoke_test_max_size=f"1.5{unit}").max_shard_bytes > 0
        assert EstimateConfig(gpu_memory=f"80{unit}").gpu_memory == f"80{unit}"


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_config_file_that_is_not_an_experiment_config_is_named_with_its_line(tmp_path, capsys):
    """Snakemake reads --configfile before the workflow's code runs, and says only "Config file is not valid JSON or
    YAML", "... with keys at top level" or raises FileNotFoundError: 'train' (a target after --configfile x.yaml):
    python -m vectorlm.config names the file, the line, and what to write."""
    broken, listed = tmp_path / "broken.yaml", tmp_path / "listed.yaml"
    broken.write_text("model: resources/tiny-llama\ntrain: {lr: [1.0e-4\nmax_seq_len: 64\n")
    listed.write_text("- model: m\n- output_dir: o\n")
    with pytest.raises(ConfigError, match=rf"config file {broken}, line 3 column \d+: not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match=rf"config file {listed} holds a list at its top level"):
        load_config(listed)
    with pytest.raises(ConfigError, match="config file train does not exist; .* write --configfile=x.yaml train"):
        load_config("train")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="empty.yaml holds no keys"):  # Snakemake refuses it too
        load_config(tmp_path / "empty.yaml")
    with pytest.raises(SystemExit, match=rf"vectorlm: config file {broken}, line 3"):
        config_main([str(broken)])
    # Several files merge in order, as --configfile a.yaml b.yaml: the later file's keys win, nested ones too.
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("model: m\noutput_dir: o\nmax_seq_len: 64\ndata: {train: t.jsonl}\ntrain: {lr: 1.0e-4, seed: 3}\n")
    second.write_text("train: {lr: 2.0e-4}\n")
    merged = load_config(first, second)
    assert (merged.train.lr, merged.train.seed, merged.data.train) == (2.0e-4, 3, "t.jsonl")
    config_main([str(first), str(second)])
    assert capsys.readouterr().out.startswith(f"{first} + {second}: a valid experiment config")


def test_load_config_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(with_("train", lr=0.1, betas=[0.8, 0.9])))
    config = load_config(path)
    assert config.train.lr == 0.1 and config.train.betas == (0.8, 0.9)
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt_field": "q"}, "data.prompt_field and data.response_field go together"),
        (
            {"messages_field": "m", "separator": "###"},
            "choose one kind of instruction data; got data.messages_field and data.separator",
        ),
        ({"chat_template": "{{ x }}"}, "data.chat_template renders chat rows: it needs data.messages_field"),
        ({"chunk_overlap": 32}, r"data.chunk_overlap \(32\) must be below half of max_seq_len \(64\)"),
    ],
)
def test_data_options_that_contradict_each_other(data, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(with_("data", **data))


@pytest.mark.parametrize(
    ("data", "mode", "fields"),
    [
        ({}, "text", {"text": "data.text_field"}),
        ({"separator": "###", "text_field": "body"}, "separator", {"body": "data.text_field"}),
        (
            {"prompt_field": "q", "response_field": "a"},
            "prompt_response",
            {"q": "data.prompt_field", "a": "data.response_field"},
        ),
        ({"messages_field": "conv"}, "messages", {"conv": "data.messages_field"}),
    ],
)
def test_data_mode_and_the_fields_it_reads(data, mode, fields):
    config = Config.from_dict(with_("data", **data))
    assert config.data.mode == mode and config.data.fields == fields


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\noutput_dir: o\nmax_seq_len: 2e3\ndata:\n  train: t.jsonl\n  text_field: 1e5\n"
                    "train:\n  lr: 1e-4\n  eps: 1e-6\n  betas: [0.9, 9.99e-1]\n  max_steps: 1e3\n")  # fmt: skip
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-4"  # YAML 1.1: a string
    config = load_config(path)
    assert (config.train.lr, config.train.eps, config.train.betas) == (1e-4, 1e-6, (0.9, 0.999))
    assert config.max_seq_len == 2000 and isinstance(config.max_seq_len, int) and config.train.max_steps == 1000
    assert config.data.text_field == "1e5"  # a string key stays a string
    with pytest.raises(ConfigError, match=r"config key max_seq_len: 1.5 is not of type 'integer'"):
        Config.from_dict({**MINIMAL, "max_seq_len": "1.5"})


@pytest.mark.parametrize("key", ["output_dir", "model"])
def test_paths_with_braces_name_the_key(key):
    with pytest.raises(ConfigError, match=rf"config key {key}: 'runs/{{lr}}' contains {{ or }}, which Snakemake reads"):
        Config.from_dict({**MINIMAL, key: "runs/{lr}"})


def test_output_dir_and_cache_dir_must_not_contain_each_other():
    """The cache is shared by experiments: an experiment inside it (or it inside one) would delete its neighbours."""
    assert Config.from_dict({**MINIMAL, "output_dir": "results/a"}).cache_dir == "results/cache"
    for output_dir, cache_dir in (("results/cache", None), ("results/a", "results/a/cache"), ("x/y", "x")):
        with pytest.raises(ConfigError, match="must not contain each other"):
            Config.from_dict({**MINIMAL, "output_dir": output_dir, "cache_dir": cache_dir})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TrainConfig(sharding="zero3"), r"config key train\.sharding: 'zero3' is not one of \['full'"),
        (lambda: TrainConfig(report_to=["neptune"]), r"config key train\.report_to\.0: 'neptune' is not one of"),
        (lambda: DataConfig(train="t.jsonl", eval_fraction=1.5), r"config key data\.eval_fraction: 1\.5 is greater"),
        (lambda: LoraSettings(target_modules="all"), r"config key lora\.target_modules: 'all' is not valid"),
        (lambda: EvaluateConfig(prompts=["x"], batch_size=0), r"config key evaluate\.batch_size: 0 is not valid"),
    ],
)
def test_a_section_built_in_code_is_checked_against_the_schema(build, message):
    """The dataclasses check their values with the schema (enums, ranges written once), as a config file is."""
    with pytest.raises(ConfigError, match=message):
        build()
