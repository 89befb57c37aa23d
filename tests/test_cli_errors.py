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
                                  "model folder without a model", "model is a file", "peft folder missing",
                                  "batch size"])
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
    elif case == "model is a file":  # (a .gguf file is a model: test_a_gguf_file_names_its_folder)
        args["--model"], option = str(tmp_path / "afile"), "--model"
    elif case == "peft folder missing":
        extra, option = ["--peft", str(tmp_path / "noadapter")], "--peft"
    elif case == "batch size":
        extra, option = ["--batch-size", "0"], "--batch-size"
    before = _listing(tmp_path)
    err = _refused(["encode", *[x for kv in args.items() for x in kv], *extra, "--no-progress"], capsys, option)
    if case == "output suffix":
        assert ".npy" in err and "emb.jsonl" in err
    assert _listing(tmp_path) == before  # nothing written


def test_a_gguf_file_names_its_folder(tmp_path, monkeypatch):
    """``--model x.gguf`` (and model_name_or_path / from_pretrained): transformers loads GGUF
    weights as (folder, gguf_file=name); the path of the file resolves to that pair (absolute,
    so a saved config names it from anywhere) and passes the CLI's up-front path check. (A
    real GGUF model through the CLI: the README's demo and tests/test_demo.py load the
    default one, whose alias resolves the same way.)"""
    from llm2vec_fast.commands.encode import _check_model_path
    from llm2vec_fast.models import resolve_model_name

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "Model.Q4.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_name("m/Model.Q4.gguf") == (str(tmp_path / "m"), {"gguf_file": "Model.Q4.gguf"})
    assert resolve_model_name("m/missing.gguf") == ("m/missing.gguf", {})  # not a file: passes through
    _check_model_path("--model", "m/Model.Q4.gguf")
    from llm2vec_fast.commands import UsageError

    with pytest.raises(UsageError, match="is a file"):
        _check_model_path("--peft", "m/Model.Q4.gguf", ("adapter_config.json",))


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


@pytest.mark.parametrize("command", ["encode", "eval-sts"])
@pytest.mark.parametrize("flag, value, cuda, why", [
    ("--device", "bogus", False, "expected a device"),
    ("--device", "cuda:x", False, "expected a device"),
    ("--device", "cuda", False, "CUDA is not available"),
    ("--device", "cuda:1", False, "CUDA is not available"),
    ("--device", "cuda:2", True, "has 2 cuda devices"),
    ("--devices", "cpu,bogus", False, "expected a device"),
    ("--devices", "cpu,cuda:0", False, "CUDA is not available"),
    ("--devices", "cuda:0,cuda:5", True, "has 2 cuda devices"),
])
def test_bad_device_is_refused_before_loading(tmp_path, capsys, toy_dir, no_loading, monkeypatch,
                                              command, flag, value, cuda, why):
    """--device / --devices: a name torch does not parse, or an accelerator this machine does
    not have, is one line naming the option (not a traceback after the model loaded)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    argv = [command, "--model", toy_dir, flag, value]
    if command == "encode":
        argv += ["--input", _write(tmp_path / "in.txt", ["a dog runs"]), "--output", str(tmp_path / "e.npy")]
    else:
        argv += ["--max-pairs", "10"]
    before = _listing(tmp_path)
    err = _refused(argv, capsys, flag)
    assert why in err and value.split(",")[-1] in err, err
    assert _listing(tmp_path) == before
    from llm2vec_fast.commands.encode import check_model_arguments

    good = ["--devices", "cpu, cuda:0,cuda:1"] if cuda else ["--device", "cpu", "--devices", "cpu,cpu"]
    check_model_arguments(_encode_args("eval-sts", ["--model", toy_dir, *good]))  # accepted


@pytest.mark.parametrize("value", ["0", "-1"])
def test_demo_refuses_bad_threads_before_loading(tmp_path, capsys, no_loading, value):
    out = tmp_path / "demo"
    err = _refused(["demo", "--toy", "--output-dir", str(out), "--threads", value], capsys, "--threads")
    assert f"got {value}" in err
    assert not out.exists()


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


# ----------------------------------------------------------------------------- loading: settings and errors


def _encode_args(command, argv):
    from llm2vec_fast.cli import build_parser

    return build_parser().parse_args([command, *argv])


@pytest.mark.parametrize("command", ["encode", "eval-sts"])
def test_a_saved_causal_encoder_loads_causal_from_the_cli(tmp_path, command):
    """Without --causal the saved enable_bidirectional applies (it was forced to True);
    --causal still forces causal attention on a bidirectional folder."""
    from llm2vec_fast.commands.encode import load_encoder
    from llm2vec_fast.encoder import LLM2Vec

    LLM2Vec(toy_model(False, seed=0), toy_tokenizer()).save(str(tmp_path / "causal"))
    bidir = LLM2Vec.from_pretrained(str(tmp_path / "causal"), enable_bidirectional=True)
    bidir.save(str(tmp_path / "bidir"))
    extra = ["--input", "x.txt", "--output", "x.npy"] if command == "encode" else []
    enc, _ = load_encoder(_encode_args(command, ["--model", str(tmp_path / "causal"), "--device", "cpu", *extra]))
    assert not enc._is_patched()
    enc, _ = load_encoder(_encode_args(command, ["--model", str(tmp_path / "bidir"), "--device", "cpu", *extra]))
    assert enc._is_patched()
    enc, _ = load_encoder(_encode_args(command, ["--model", str(tmp_path / "bidir"), "--causal", "--device", "cpu",
                                                 *extra]))
    assert not enc._is_patched()


def test_encode_a_saved_causal_encoder_matches_python(tmp_path, capsys):
    from llm2vec_fast.cli import main
    from llm2vec_fast.encoder import LLM2Vec

    d = str(tmp_path / "causal")
    LLM2Vec(toy_model(False, seed=0), toy_tokenizer()).save(d)
    texts = toy_texts(4, seed=3)
    expected = LLM2Vec.from_pretrained(d).encode(texts, convert_to_numpy=True, show_progress_bar=False)
    out = str(tmp_path / "e.npy")
    assert main(["encode", "--model", d, "--input", _write(tmp_path / "in.txt", texts), "--output", out,
                 "--no-progress", "--device", "cpu"]) == 0
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-6)


def test_encode_peft_folder_written_by_save(tmp_path, capsys, toy_dir):
    """--model base --peft <a folder LLM2Vec.save wrote for an unmerged adapter>: the folder's
    adapter_only / base_model_name_or_path do not turn --model into an adapter folder."""
    from peft import LoraConfig, get_peft_model

    from llm2vec_fast.cli import main
    from llm2vec_fast.encoder import LLM2Vec

    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    get_peft_model(toy_model(False, seed=3), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False)).save_pretrained(tmp_path / "A")
    LLM2Vec.from_pretrained(toy_dir, peft_model_name_or_path=str(tmp_path / "A")).save(str(tmp_path / "saved"))
    assert json.load(open(tmp_path / "saved" / "llm2vec_fast_config.json"))["adapter_only"] is True
    texts = toy_texts(4, seed=5)
    expected = LLM2Vec.from_pretrained(str(tmp_path / "saved")).encode(texts, convert_to_numpy=True,
                                                                       show_progress_bar=False)
    out = str(tmp_path / "e.npy")
    assert main(["encode", "--model", toy_dir, "--peft", str(tmp_path / "saved"), "--input",
                 _write(tmp_path / "in.txt", texts), "--output", out, "--no-progress", "--device", "cpu"]) == 0
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-5)


def _encode_main(tmp_path, model, *extra):
    from llm2vec_fast.cli import main

    texts = _write(tmp_path / "in.txt", ["a dog runs"])
    return main(["encode", "--model", model, "--input", texts, "--output", str(tmp_path / "e.npy"),
                 "--no-progress", "--device", "cpu", *extra])


@pytest.mark.parametrize("error", [ValueError("an internal fault, not a missing model"),
                                   OSError(28, "No space left on device"), RuntimeError("boom")])
def test_encode_raises_a_load_fault_with_its_traceback(tmp_path, capsys, monkeypatch, toy_dir, error):
    """Only a model that cannot be found is a usage error: any other failure while loading
    propagates as it is (it was cut to one line, exit 2, blaming --model)."""
    from llm2vec_fast.encoder import LLM2Vec

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(LLM2Vec, "from_pretrained", classmethod(fail))
    with pytest.raises(type(error)) as e:
        _encode_main(tmp_path, toy_dir)
    assert e.value is error
    assert "error: --model" not in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no weights", "no tokenizer", "hub entry not found", "long message"])
def test_encode_a_model_that_cannot_be_found_is_one_line(tmp_path, capsys, monkeypatch, toy_dir, case):
    from llm2vec_fast.encoder import LLM2Vec

    model = toy_dir
    if case == "no weights":  # a config and a tokenizer, no weights: transformers' own error
        model = str(tmp_path / "noweights")
        toy_model(False, seed=0).config.save_pretrained(model)
        toy_tokenizer().save_pretrained(model)
    elif case == "no tokenizer":
        model = str(tmp_path / "notok")
        toy_model(False, seed=0).save_pretrained(model)
    else:
        from huggingface_hub.errors import LocalEntryNotFoundError

        def fail(*a, **k):
            if case == "long message":
                raise OSError("someone/x is not a local folder and is not a valid model identifier listed on "
                              "'https://huggingface.co/models' " + "x" * 400 + " END")
            raise OSError("cannot fetch config.json") from LocalEntryNotFoundError("not in the cache")

        monkeypatch.setattr(LLM2Vec, "from_pretrained", classmethod(fail))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _encode_main(tmp_path, model)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm2vec-fast encode: error: --model: cannot load") and "\n" not in err, err
    assert {"no weights": "holds no weights", "no tokenizer": "holds no tokenizer",
            "hub entry not found": "cannot fetch config.json", "long message": "END"}[case] in err


def test_train_errors_during_training_keep_their_traceback(tmp_path, capsys, monkeypatch):
    """A setting refused before training is one line (exit 2), also one found once the model
    is loaded; a ValueError raised while training is a fault and propagates (it was printed
    as a one-line usage error)."""
    import transformers

    from llm2vec_fast.cli import main

    model = str(tmp_path / "clm")
    toy_model(True, seed=0).save_pretrained(model)
    toy_tokenizer().save_pretrained(model)
    data = ["--model-name-or-path", model, "--train-file", _write(tmp_path / "t.txt", toy_texts(40, seed=7)),
            "--max-steps", "1", "--per-device-batch-size", "4", "--no-progress"]
    capsys.readouterr()
    assert main(["simcse", *data, "--output-dir", str(tmp_path / "a"), "--lora-target-modules", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading progress bar
    assert err.startswith("llm2vec-fast simcse: error: lora_target_modules: none of") and "\n" not in err, err

    def fault(self, *a, **k):
        raise ValueError("a fault inside the training loop")

    monkeypatch.setattr(transformers.Trainer, "train", fault)
    for command in ("mntp", "simcse"):
        with pytest.raises(ValueError, match="a fault inside the training loop"):
            main([command, *data, "--output-dir", str(tmp_path / command)])
        assert "error:" not in capsys.readouterr().err
