"""Config values are checked against each field's annotation before anything loads.

Values come from Python, JSON, YAML and flags: PyYAML reads ``2e-1`` as a string (YAML 1.1
floats need a dot) and a quoted ``"false"`` is a truthy string, so the checks are per type,
not per field. Every refusal is a ``ValueError`` that starts with the field's name, which the
CLI prints as one line (exit code 2, no output folder).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import pytest

from llm2vec_fast.training.config import (
    STAGES, MNTPConfig, SimCSEConfig, SupervisedConfig, add_config_arguments, config_from_args, make_config,
    read_config_file,
)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _no_output(path):
    assert not os.path.exists(path), f"{path} was created although the run was refused"


# ----------------------------------------------------------------------------- make_config


def test_numeric_strings_become_numbers():
    cfg = make_config(MNTPConfig, dict(mlm_probability="2e-1", lora_dropout="5e-2", learning_rate="1e-4",
                                       validation_split_percentage="10", eval_steps="5", max_train_samples=" 7 "))
    assert cfg.mlm_probability == 0.2 and type(cfg.mlm_probability) is float
    assert cfg.lora_dropout == 0.05 and cfg.learning_rate == 1e-4 and cfg.validation_split_percentage == 10.0
    assert cfg.eval_steps == 5 and type(cfg.eval_steps) is int and cfg.max_train_samples == 7
    cfg = make_config(SimCSEConfig, dict(mini_batch_size="4", attention_dropout="0.1", temperature="5e-2"))
    assert cfg.mini_batch_size == 4 and cfg.attention_dropout == 0.1 and cfg.temperature == 0.05
    # an int where a float is declared is that float
    cfg = make_config(SimCSEConfig, dict(learning_rate=1, weight_decay=0))
    assert type(cfg.learning_rate) is float and type(cfg.weight_decay) is float


@pytest.mark.parametrize("cls, name, value, expected", [
    (MNTPConfig, "mlm_probability", "2e0", "a float in (0, 1), got 2.0"),  # parsed, then out of range
    (MNTPConfig, "lora_dropout", "abc", "a finite float"),
    (MNTPConfig, "weight_decay", "x", "a finite float"),
    (MNTPConfig, "weight_decay", -1.0, "a float >= 0"),
    (SimCSEConfig, "attention_dropout", "high", "a finite float or None"),
    (MNTPConfig, "use_lora", "false", "a bool"),
    (MNTPConfig, "use_lora", 0, "a bool"),
    (MNTPConfig, "bf16", "yes", "a bool (true or false) or None"),
    (SupervisedConfig, "hard_negatives", "no", "a bool"),
    (MNTPConfig, "max_train_samples", 2.5, "an int or None"),
    (MNTPConfig, "max_train_samples", "2.5", "an int or None"),
    (MNTPConfig, "eval_steps", 2.5, "an int"),
    (MNTPConfig, "eval_steps", 3.0, "an int"),                        # no float for an int, even integral
    (MNTPConfig, "eval_steps", "1e3", "an int"),
    (MNTPConfig, "per_device_batch_size", True, "an int"),
    (SimCSEConfig, "mini_batch_size", 2.5, "an int or None"),
    (MNTPConfig, "seed", "x", "an int"),
    (MNTPConfig, "model_name_or_path", 123, "a string"),
    (MNTPConfig, "lora_target_modules", 5, "a list of strings"),
    (MNTPConfig, "lora_target_modules", ["q_proj", 3], "a list of strings"),
    (SupervisedConfig, "train_files", {"a": 1}, "a list of strings"),
    (MNTPConfig, "optim", "nope", "one of ['adamw_torch'"),
    (MNTPConfig, "lr_scheduler_type", "nope", "one of ['linear'"),
    (MNTPConfig, "save_total_limit", -1, "None (keep every checkpoint) or an int >= 1"),
    (MNTPConfig, "save_total_limit", 0, "None (keep every checkpoint) or an int >= 1"),
])
def test_bad_values_raise_value_error_naming_the_field(cls, name, value, expected):
    with pytest.raises(ValueError) as e:
        make_config(cls, {name: value})
    msg = str(e.value)
    assert msg.startswith(f"{name}: expected ") and expected in msg
    assert f"got {value!r}" in msg or name == "mlm_probability"
    assert "\n" not in msg


def test_non_finite_rates_are_refused():
    for cls, name in ((MNTPConfig, "learning_rate"), (SimCSEConfig, "learning_rate"), (SimCSEConfig, "temperature"),
                      (SupervisedConfig, "temperature")):
        for v in (math.inf, -math.inf, math.nan, "inf", "nan", "1e400"):
            with pytest.raises(ValueError, match=rf"^{name}: expected a finite float"):
                make_config(cls, {name: v})


def test_bool_strings_are_refused_like_the_cli_does():
    """The CLI has --flag / --no-flag and never parses bool strings; a config file may not either."""
    for cls in STAGES.values():
        bools = [f.name for f in dataclasses.fields(cls) if f.type in ("bool", "bool | None")]
        assert "use_lora" in bools and "bf16" in bools
        for name in bools:
            for v in ("true", "false", "yes", "no", "1", "0", 1):
                with pytest.raises(ValueError, match=rf"^{name}: expected a bool"):
                    make_config(cls, {name: v})
            assert getattr(make_config(cls, {name: False}), name) is False


def test_every_bool_flag_and_its_negation_are_listed_by_help():
    """--no-<flag> worked but --help hid it, so a default-True setting (--use-lora,
    --cross-rank) had no visible way to be turned off; --flag / --no-flag set True / False and
    leave the file's (or the default) value when absent."""
    import argparse

    from llm2vec_fast.training.config import add_config_arguments

    for cls in STAGES.values():
        p = argparse.ArgumentParser()
        add_config_arguments(p, cls)
        text = " ".join(p.format_help().split())
        bools = [f.name for f in dataclasses.fields(cls) if f.type in ("bool", "bool | None")]
        for name in bools:
            flag = "--" + name.replace("_", "-")
            assert f"{flag}, --no-{flag[2:]}" in text, name
            assert getattr(p.parse_args([flag]), name) is True
            assert getattr(p.parse_args(["--no-" + flag[2:]]), name) is False
            assert getattr(p.parse_args([]), name) is None


def test_max_grad_norm_reaches_the_trainer_and_is_checked(tmp_path):
    """Clipping was always transformers' default 1.0 (no setting); 0 turns it off."""
    from llm2vec_fast.training.pipeline import training_arguments

    for v in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="^max_grad_norm: expected a finite float"):
            make_config(SimCSEConfig, {"max_grad_norm": v}).validate()
    for v in (0.0, 2.5):
        cfg = make_config(SimCSEConfig, {"max_grad_norm": v, "output_dir": str(tmp_path)})
        assert training_arguments(cfg, save=False).max_grad_norm == v
    assert make_config(SimCSEConfig, {}).max_grad_norm == 1.0


def test_every_field_is_type_checked():
    """No per-field list: a value no annotation allows is refused for every field of every stage."""
    for cls in STAGES.values():
        for f in dataclasses.fields(cls):
            with pytest.raises(ValueError, match=rf"^{f.name}: expected "):
                make_config(cls, {f.name: object()})


def test_a_single_string_is_a_one_element_list():
    cfg = make_config(SupervisedConfig, dict(train_files="a.jsonl", lora_target_modules="q_proj"))
    assert cfg.train_files == ["a.jsonl"] and cfg.lora_target_modules == ["q_proj"]
    cfg = make_config(SupervisedConfig, dict(train_files=(pathlib.Path("a.jsonl"), "b.jsonl"),
                                             output_dir=pathlib.Path("out")))
    assert cfg.train_files == ["a.jsonl", "b.jsonl"] and cfg.output_dir == "out"


def test_transformers_names_and_limits():
    with pytest.raises(ValueError, match=r"^optim: expected one of .*'sgd'.*got 'nope'"):
        make_config(MNTPConfig, dict(optim="nope", save_total_limit=2, lr_scheduler_type="cosine"))
    with pytest.raises(ValueError, match=r"^lr_scheduler_type: expected one of .*'cosine'.*got 'Cosine'"):
        make_config(MNTPConfig, dict(optim="sgd", lr_scheduler_type="Cosine"))
    cfg = make_config(MNTPConfig, dict(optim="sgd", lr_scheduler_type="cosine", save_total_limit="2"))
    assert cfg.save_total_limit == 2


def test_validate_checks_a_config_built_directly():
    cfg = MNTPConfig(mlm_probability="2e-1", use_lora="false")
    with pytest.raises(ValueError, match="^use_lora: expected a bool"):
        cfg.validate()
    cfg = MNTPConfig(mlm_probability="2e-1")
    cfg.validate()
    assert cfg.mlm_probability == 0.2


# ----------------------------------------------------------------------------- files and CLI


def test_yaml_exponent_floats_from_a_config_file(tmp_path):
    import argparse

    pytest.importorskip("yaml")
    y = _write(tmp_path / "c.yaml", "mlm_probability: 2e-1\nlora_dropout: 5e-2\neval_steps: 3\n")
    assert read_config_file(y)["mlm_probability"] == "2e-1"  # PyYAML (YAML 1.1): a string
    p = argparse.ArgumentParser()
    add_config_arguments(p, MNTPConfig)
    cfg = config_from_args(MNTPConfig, p.parse_args(["--config", y]))
    assert cfg.mlm_probability == 0.2 and cfg.lora_dropout == 0.05 and cfg.eval_steps == 3


def test_non_string_keys_in_a_config_file(tmp_path):
    pytest.importorskip("yaml")
    y = _write(tmp_path / "c.yaml", "2024: x\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['2024'\]"):
        make_config(MNTPConfig, read_config_file(y))


@pytest.mark.parametrize("name, text, expected", [
    ("a.yaml", "mlm_probability: 2e0\n", "mlm_probability: expected a float in (0, 1), got 2.0"),
    ("b.yaml", "use_lora: \"false\"\n", "use_lora: expected a bool (true or false), got 'false'"),
    ("c.yaml", "learning_rate: .inf\n", "learning_rate: expected a finite float, got inf"),
    ("d.yaml", "optim: nope\n", "optim: expected one of"),
    ("e.json", json.dumps({"max_train_samples": 1.5}), "max_train_samples: expected an int or None, got 1.5"),
])
def test_cli_config_file_errors_are_one_line(tmp_path, capsys, name, text, expected):
    from llm2vec_fast.cli import main

    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    cfg = _write(tmp_path / name, text)
    out = str(tmp_path / "out")
    assert main(["mntp", "--config", cfg, "--output-dir", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llm2vec-fast mntp: error: {expected}") and "\n" not in err
    _no_output(out)


def test_cli_accepts_yaml_exponent_floats(tmp_path, capsys):
    """The YAML file is accepted: the run gets as far as the (missing) training file."""
    from llm2vec_fast.cli import main

    pytest.importorskip("yaml")
    cfg = _write(tmp_path / "c.yaml", "mlm_probability: 2e-1\nlora_dropout: 5e-2\n")
    out = str(tmp_path / "out")
    assert main(["mntp", "--config", cfg, "--output-dir", out]) == 2
    assert capsys.readouterr().err.strip().startswith("llm2vec-fast mntp: error: train_file:")
    _no_output(out)


# ----------------------------------------------------------------------------- seed, paths, fsdp


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63])
def test_seed_outside_numpys_range_is_refused(seed):
    """numpy (transformers' set_seed) takes seeds in [0, 2**32); others passed validate() and
    failed only after the model had loaded."""
    with pytest.raises(ValueError, match=r"^seed: expected an int in \[0, 2\*\*32\), got "):
        make_config(MNTPConfig, dict(seed=seed))


def test_seed_range_ends_are_accepted():
    assert make_config(MNTPConfig, dict(seed=0)).seed == 0
    assert make_config(SimCSEConfig, dict(seed=str(2**32 - 1))).seed == 2**32 - 1


def test_cli_seed_out_of_range_is_one_line(tmp_path, capsys):
    from llm2vec_fast.cli import main

    out = str(tmp_path / "out")
    assert main(["mntp", "--seed", "-1", "--output-dir", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm2vec-fast mntp: error: seed: expected an int in [0, 2**32)") and "\n" not in err
    _no_output(out)


@pytest.mark.parametrize("name, text, expected", [
    ("a.yaml", "output_dir: 2024\nmodel_name_or_path: 0123\ntrain_file: 1.50\n",
     dict(output_dir="2024", model_name_or_path="0123", train_file="1.50")),
    ("b.yaml", "output-dir: 2024-01-01\ntrain_files: [2023, b.jsonl, 1_000]\n",
     dict(output_dir="2024-01-01", train_files=["2023", "b.jsonl", "1_000"])),
    ("c.json", '{"output_dir": 2024.10, "resume_from_checkpoint": null}',
     dict(output_dir="2024.10", resume_from_checkpoint=None)),
])
def test_path_fields_read_as_numbers_or_dates_are_taken_as_written(tmp_path, name, text, expected):
    """YAML reads ``output_dir: 2024`` as an int (and ``0123`` as 83, ``2024-01-01`` as a date):
    a field naming a file or folder takes the text as written instead of refusing it."""
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    cls = SupervisedConfig if "train_files" in expected else MNTPConfig
    cfg = make_config(cls, read_config_file(_write(tmp_path / name, text)))
    for k, v in expected.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k))
    # a number is still refused where a name is not a path, and from Python
    with pytest.raises(ValueError, match="^output_dir: expected a string, got 2024"):
        make_config(MNTPConfig, dict(output_dir=2024))


def test_yaml_number_for_a_non_path_string_field_is_still_refused(tmp_path):
    pytest.importorskip("yaml")
    with pytest.raises(ValueError, match="^optim: expected a string, got 5"):
        make_config(MNTPConfig, read_config_file(_write(tmp_path / "c.yaml", "optim: 5\n")))


def test_fsdp_as_a_list_of_words(tmp_path):
    """TrainingArguments reads fsdp as space-separated words or their list; a YAML list was refused."""
    pytest.importorskip("yaml")
    cfg = make_config(MNTPConfig, read_config_file(_write(tmp_path / "c.yaml", "fsdp: [full_shard, auto_wrap]\n")))
    assert cfg.fsdp == "full_shard auto_wrap"
    assert make_config(MNTPConfig, dict(fsdp=("full_shard",))).fsdp == "full_shard"
    with pytest.raises(ValueError, match="^fsdp: expected a string"):
        make_config(MNTPConfig, dict(fsdp=["full_shard", 3]))
