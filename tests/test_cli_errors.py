"""Bad command-line values end in one line and exit status 2, before the model loads.

``encode`` (input, output path and suffix, model folder), ``eval-sts`` (pair count, batch
size), ``demo`` and the train commands (an output folder that cannot be created). Loading
is made to fail loudly, so a check that runs after it shows up as the wrong error; the
refused runs write nothing.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llm2vec_fast.training.toy import toy_model, toy_texts, toy_tokenizer


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A saved toy model + tokenizer (64-dim, seconds to load): a --model folder."""
    d = str(tmp_path_factory.mktemp("toy_model"))
    toy_model(False, seed=3).save_pretrained(d)
    toy_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def no_loading(monkeypatch):
    """Every way the commands load a model raises: an error seen instead comes from a check
    that ran before loading."""
    import llm2vec_fast.training.pipeline as pipeline
    import llm2vec_fast.training.toy as toy
    from llm2vec_fast.encoder import LLM2Vec

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad option was noticed")

    monkeypatch.setattr(LLM2Vec, "from_pretrained", classmethod(boom))
    monkeypatch.setattr(pipeline, "load_model", boom)
    monkeypatch.setattr(toy, "toy_model", boom)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _refused(argv, capsys, option):
    """``main(argv)`` stops with status 2 and one stderr line naming ``option``."""
    from llm2vec_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llm2vec-fast {argv[0]}: error: {option}:") and "\n" not in err, err
    return err


def _listing(path):
    return sorted(os.listdir(path))


@pytest.mark.parametrize("case", ["missing input", "output folder missing", "output under a file",
                                  "output suffix", "output is a folder", "model folder missing",
                                  "model folder without a model", "peft folder missing", "batch size"])
def test_encode_refuses_bad_paths_before_loading(tmp_path, capsys, toy_dir, no_loading, case):
    texts = _write(tmp_path / "in.txt", ["a dog runs", "the cat sits"])
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    args = {"--model": toy_dir, "--input": texts, "--output": str(tmp_path / "emb.npy")}
    extra, option = [], None
    if case == "missing input":
        args["--input"], option = str(tmp_path / "nope.txt"), "--input"
    elif case == "output folder missing":
        args["--output"], option = str(tmp_path / "nodir" / "x.npy"), "--output"
    elif case == "output under a file":
        args["--output"], option = str(tmp_path / "afile" / "x.npy"), "--output"
    elif case == "output suffix":
        args["--output"], option = str(tmp_path / "emb.jsonl"), "--output"
    elif case == "output is a folder":
        args["--output"], option = str(tmp_path / "empty") + os.sep, "--output"
    elif case == "model folder missing":
        args["--model"], option = str(tmp_path / "nomodel"), "--model"
    elif case == "model folder without a model":
        args["--model"], option = str(tmp_path / "empty"), "--model"
    elif case == "peft folder missing":
        extra, option = ["--peft", str(tmp_path / "noadapter")], "--peft"
    elif case == "batch size":
        extra, option = ["--batch-size", "0"], "--batch-size"
    before = _listing(tmp_path)
    err = _refused(["encode", *[x for kv in args.items() for x in kv], *extra, "--no-progress"], capsys, option)
    if case == "output suffix":
        assert ".npy" in err and "emb.jsonl" in err
    assert _listing(tmp_path) == before  # nothing written


def test_encode_turns_a_load_failure_into_one_line(tmp_path, capsys, monkeypatch):
    """A hub name (allowed up front) that does not load: the loader's error, on one line."""
    from llm2vec_fast.encoder import LLM2Vec

    def unreachable(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(LLM2Vec, "from_pretrained", classmethod(unreachable))
    texts = _write(tmp_path / "in.txt", ["a dog runs"])
    err = _refused(["encode", "--model", "someone/some-model", "--input", texts, "--output",
                    str(tmp_path / "e.npy"), "--no-progress"], capsys, "--model")
    assert "someone/some-model" in err and "couldn't connect" in err and "Check your connection" in err
    assert not os.path.exists(tmp_path / "e.npy")


def test_encode_output_without_suffix_writes_and_reports_the_npy_path(tmp_path, capsys, toy_dir):
    from llm2vec_fast.cli import main

    texts = _write(tmp_path / "in.txt", ["a dog runs", "the cat sits", "a man plays"])
    out = tmp_path / "emb_out"
    assert main(["encode", "--model", toy_dir, "--input", texts, "--output", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}.npy: 3 x 64 float32" in printed, printed
    assert not out.exists() and np.load(f"{out}.npy").shape == (3, 64)
    upper = tmp_path / "E.NPY"  # a .npy suffix in any case is kept as given
    assert main(["encode", "--model", toy_dir, "--input", texts, "--output", str(upper), "--no-progress",
                 "--device", "cpu"]) == 0
    assert f"wrote {upper}:" in capsys.readouterr().out and np.load(upper).shape == (3, 64)


@pytest.mark.parametrize("flag, value", [("--max-pairs", "1"), ("--max-pairs", "0"), ("--max-pairs", "-5"),
                                         ("--batch-size", "0"), ("--max-length", "0")])
def test_eval_sts_refuses_bad_values_before_loading(capsys, toy_dir, no_loading, flag, value):
    argv = ["eval-sts", "--model", toy_dir, flag, value]
    if flag != "--max-pairs":
        argv += ["--max-pairs", "10"]
    err = _refused(argv, capsys, flag)
    assert f"got {value}" in err


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_demo_refuses_an_output_dir_it_cannot_create_before_loading(tmp_path, capsys, no_loading, where):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out" if where == "under a file" else tmp_path / "afile"
    before = _listing(tmp_path)
    err = _refused(["demo", "--toy", "--output-dir", str(out)], capsys, "--output-dir")
    assert str(tmp_path / "afile") in err
    assert _listing(tmp_path) == before and (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("flag, value", [("--mntp-batch-size", "0"), ("--simcse-lr", "-1"),
                                         ("--simcse-dropout", "1.5")])
def test_demo_refuses_bad_stage_settings_before_loading(tmp_path, capsys, no_loading, flag, value):
    out = tmp_path / "demo"
    _refused(["demo", "--toy", "--output-dir", str(out), flag, value], capsys, flag)
    assert not out.exists()


@pytest.mark.parametrize("command", ["mntp", "simcse", "supervised"])
def test_train_commands_refuse_an_output_dir_under_a_file_before_loading(tmp_path, capsys, no_loading, command):
    from llm2vec_fast.cli import main

    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "out")
    if command == "supervised":
        rows = [json.dumps({"query": q, "positive": p, "negative": n}) for q, p, n in
                zip(toy_texts(20, seed=1), toy_texts(20, seed=2), toy_texts(20, seed=3))]
        data = ["--train-files", _write(tmp_path / "nli.jsonl", rows)]
    else:
        data = ["--train-file", _write(tmp_path / "t.txt", toy_texts(40, seed=7))]
    before = _listing(tmp_path)
    assert main([command, *data, "--output-dir", out, "--max-steps", "1", "--per-device-batch-size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llm2vec-fast {command}: error: output_dir:") and "\n" not in err, err
    assert str(tmp_path / "afile") in err
    assert _listing(tmp_path) == before
