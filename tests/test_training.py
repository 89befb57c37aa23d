"""Training stages on a tiny Llama: losses fall, checkpoints resume exactly, bad input fails early,
the CLI writes models that ``LLM2Vec.from_pretrained`` loads."""
from __future__ import annotations

import json
import os

import pytest
import torch

from llm2vec_fast.training.config import MNTPConfig, SimCSEConfig, SupervisedConfig, make_config
from llm2vec_fast.training.data import arrange_batches
from llm2vec_fast.training.toy import toy_model, toy_texts, toy_tokenizer

# bf16 off: on a CUDA machine the default would switch to bf16 autocast; these tests check fp32 numbers
FAST = dict(progress=False, logging_steps=1, save_steps=0, max_seq_length=24, bf16=False)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A saved toy causal LM + tokenizer: a model folder for the file-to-file stages."""
    d = str(tmp_path_factory.mktemp("toy_model"))
    toy_model(True, seed=3, initializer_range=0.1).save_pretrained(d)
    toy_tokenizer().save_pretrained(d)
    return d


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_mntp_steps_lower_the_loss(tmp_path):
    from llm2vec_fast.training.pipeline import train_mntp

    cfg = make_config(MNTPConfig, dict(FAST, output_dir=str(tmp_path / "m"), max_steps=24, per_device_batch_size=16,
                                       learning_rate=3e-3, use_lora=False, freeze_embeddings=False, mlm_probability=0.3))
    texts = toy_texts(400, seed=1, structured=True)
    model, trainer = train_mntp(toy_model(True, seed=1), toy_tokenizer(), texts, cfg, eval_texts=texts[:64],
                                save_checkpoints=False)
    losses = _losses(trainer)
    assert len(losses) == 24 and all(map(lambda x: x == x, losses))
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
    ev = [h for h in trainer.state.log_history if "eval_accuracy" in h][-1]
    assert ev["eval_labelled_tokens"] > 50 and ev["eval_accuracy"] > 0.2, ev  # chance is about 1/70


def test_simcse_steps_lower_the_loss_lora(tmp_path):
    from llm2vec_fast.training.pipeline import train_contrastive

    cfg = make_config(SimCSEConfig, dict(FAST, output_dir=str(tmp_path / "s"), max_steps=16, per_device_batch_size=16,
                                         learning_rate=2e-3, use_lora=True, lora_r=8, attention_dropout=0.3,
                                         temperature=0.5))
    model, trainer = train_contrastive(toy_model(False, seed=2, initializer_range=0.3), toy_tokenizer(),
                                       toy_texts(300, seed=2), cfg, mode="simcse", save_checkpoints=False)
    losses = _losses(trainer)
    assert len(losses) == 16 and all(x == x for x in losses)
    # The training losses see fresh dropout views each step (too noisy to compare a few
    # steps); the loss of one fixed batch in eval mode does not. peft starts lora_B at zero,
    # so the model with its adapter disabled is the model training started from.
    texts = toy_texts(300, seed=2)
    batch = trainer.data_collator([{"text": t} for t in texts[:48]])
    tm = trainer.model
    tm.eval()
    with torch.no_grad():
        after = float(trainer.compute_loss(tm, batch))
        with model.disable_adapter():
            before = float(trainer.compute_loss(tm, batch))
    assert after < 0.985 * before, (before, after)  # measured: 0.958-0.972 over 3 seeds, fused or not
    assert hasattr(model, "peft_config")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


@pytest.mark.parametrize("stage", ["mntp", "simcse_gradcache"])
def test_resume_from_checkpoint_continues_with_the_same_losses(tmp_path, stage):
    from llm2vec_fast.training.pipeline import train_contrastive, train_mntp

    tok = toy_tokenizer()
    texts = toy_texts(200, seed=5, structured=True)
    out = str(tmp_path / "run")

    def run(resume=None):
        torch.manual_seed(0)  # the model-building RNG does not matter: toy_model is seeded
        if stage == "mntp":
            cfg = make_config(MNTPConfig, dict(FAST, output_dir=out, max_steps=6, per_device_batch_size=8,
                                               learning_rate=1e-3, use_lora=False, save_steps=3, backend="torch",
                                               resume_from_checkpoint=resume))
            _, tr = train_mntp(toy_model(True, seed=5), tok, texts, cfg)
        else:
            cfg = make_config(SimCSEConfig, dict(FAST, output_dir=out, max_steps=6, per_device_batch_size=6,
                                                 learning_rate=1e-3, use_lora=True, save_steps=3, temperature=0.3,
                                                 attention_dropout=0.2, mini_batch_size=4, backend="torch",
                                                 resume_from_checkpoint=resume))
            _, tr = train_contrastive(toy_model(False, seed=5), tok, texts, cfg, mode="simcse")
        return {h["step"]: h["loss"] for h in tr.state.log_history if "loss" in h}, tr._samples

    full, rows_full = run()
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert os.path.isdir(os.path.join(out, "checkpoint-3"))
    resumed, rows_resumed = run(resume=os.path.join(out, "checkpoint-3"))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's log history
    assert rows_resumed * 2 == rows_full, "the resumed run must train steps 4-6 only"
    for s in (4, 5, 6):
        assert resumed[s] == pytest.approx(full[s], rel=1e-5, abs=1e-7), (s, full, resumed)
    # "latest" finds the newest checkpoint
    from llm2vec_fast.training.pipeline import resolve_checkpoint

    assert resolve_checkpoint(make_config(MNTPConfig, dict(output_dir=out, resume_from_checkpoint="latest"))).endswith(
        "checkpoint-6")


# ----------------------------------------------------------------------------- bad input


def _no_output(path):
    assert not os.path.exists(path), f"{path} was created although the run was refused"


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"\n  \n", "empty"),
    (b"\xff\xfe\xfa bad bytes\n", "cannot read"),
])
def test_bad_text_files_fail_before_training(tmp_path, toy_dir, content, match):
    from llm2vec_fast.training.pipeline import run_mntp, run_simcse

    f = tmp_path / "train.txt"
    f.write_bytes(content)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=match):
        run_mntp(make_config(MNTPConfig, dict(model_name_or_path=toy_dir, train_file=str(f), output_dir=out)))
    with pytest.raises(ValueError, match=match):
        run_simcse(make_config(SimCSEConfig, dict(model_name_or_path=toy_dir, train_file=str(f), output_dir=out)))
    _no_output(out)


def test_missing_file_and_missing_field_and_small_batch(tmp_path, toy_dir):
    from llm2vec_fast.training.pipeline import run_simcse, run_supervised

    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        run_simcse(make_config(SimCSEConfig, dict(model_name_or_path=toy_dir, train_file=str(tmp_path / "nope.txt"),
                                                  output_dir=out)))
    good = json.dumps({"query": "a dog", "positive": "the dog", "negative": "a cat"})
    bad = _write(tmp_path / "qa.jsonl", [good, json.dumps({"query": "a dog", "negative": "a cat"})])
    with pytest.raises(ValueError, match=r"qa.jsonl:2 is missing field 'positive'"):
        run_supervised(make_config(SupervisedConfig, dict(model_name_or_path=toy_dir, train_files=[bad],
                                                          output_dir=out)))
    notjson = _write(tmp_path / "nj.jsonl", [good, "{not json"])
    with pytest.raises(ValueError, match=r"nj.jsonl:2 is not valid JSON"):
        run_supervised(make_config(SupervisedConfig, dict(model_name_or_path=toy_dir, train_files=[notjson],
                                                          output_dir=out)))
    with pytest.raises(ValueError, match="per_device_batch_size: a contrastive loss needs at least 2"):
        make_config(SimCSEConfig, dict(per_device_batch_size=1, output_dir=out))
    with pytest.raises(ValueError, match="per_device_batch_size: a contrastive loss needs at least 2"):
        make_config(SupervisedConfig, dict(per_device_batch_size=1, output_dir=out))
    texts = _write(tmp_path / "t.txt", toy_texts(5))
    with pytest.raises(ValueError, match="per_device_batch_size"):  # more texts per step than the file holds
        run_simcse(make_config(SimCSEConfig, dict(model_name_or_path=toy_dir, train_file=texts, output_dir=out,
                                                  per_device_batch_size=8)))
    _no_output(out)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from llm2vec_fast.cli import main

    out = str(tmp_path / "out")
    empty = _write(tmp_path / "e.jsonl", [""])
    assert main(["supervised", "--train-files", empty, "--output-dir", out]) == 2
    err = capsys.readouterr().err
    assert "error: train_files:" in err and "empty" in err
    assert main(["simcse", "--train-file", empty, "--per-device-batch-size", "1", "--output-dir", out]) == 2
    assert "at least 2" in capsys.readouterr().err
    cfg = _write(tmp_path / "c.yaml", ["learning-rate: 1e-4", "bogus_key: 3"])
    assert main(["mntp", "--config", cfg, "--output-dir", out]) == 2
    assert "unknown setting" in capsys.readouterr().err
    _no_output(out)


def test_config_file_and_flags(tmp_path):
    import argparse

    from llm2vec_fast.training.config import add_config_arguments, config_from_args

    y = _write(tmp_path / "c.yaml", ["learning_rate: 1.0e-4", "per-device-batch-size: 12", "use_lora: false",
                                     "lora_target_modules: [q_proj, v_proj]"])
    p = argparse.ArgumentParser()
    add_config_arguments(p, SimCSEConfig)
    cfg = config_from_args(SimCSEConfig, p.parse_args(["--config", y, "--per-device-batch-size", "6", "--symmetric"]))
    assert cfg.learning_rate == 1e-4 and cfg.per_device_batch_size == 6 and cfg.use_lora is False
    assert cfg.symmetric is True and cfg.lora_target_modules == ["q_proj", "v_proj"]
    cfg = config_from_args(SimCSEConfig, p.parse_args(["--no-use-lora", "--mini-batch-size", "4"]))
    assert cfg.use_lora is False and cfg.mini_batch_size == 4 and cfg.temperature == 0.05
    j = _write(tmp_path / "c.json", [json.dumps({"mlm_probability": 0.4, "mask_strategy": "all"})])
    p2 = argparse.ArgumentParser()
    add_config_arguments(p2, MNTPConfig)
    cfg = config_from_args(MNTPConfig, p2.parse_args(["--config", j]))
    assert cfg.mlm_probability == 0.4 and cfg.mask_strategy == "all"
    with pytest.raises(ValueError, match="mlm_probability"):
        make_config(MNTPConfig, dict(mlm_probability=1.5))


def test_arranged_batches_come_from_one_dataset():
    data = {"a": [("a", i) for i in range(50)], "b": [("b", i) for i in range(23)], "c": [("c", i) for i in range(7)]}
    order = arrange_batches(data, 8, steps=20, seed=0)
    assert len(order) == 160
    blocks = [order[i : i + 8] for i in range(0, 160, 8)]
    assert all(len({x[0] for x in b}) == 1 for b in blocks)
    assert {b[0][0] for b in blocks} == {"a", "b"}  # "c" is smaller than one batch
    assert arrange_batches(data, 8, steps=20, seed=0) == order
    with pytest.raises(ValueError, match="larger than every dataset"):
        arrange_batches({"c": data["c"]}, 8, steps=1, seed=0)


# ----------------------------------------------------------------------------- end to end (CLI)


def test_cli_mntp_lora_then_simcse_then_supervised(tmp_path, toy_dir):
    from llm2vec_fast.cli import main
    from llm2vec_fast.encoder import LLM2Vec

    texts = _write(tmp_path / "t.txt", toy_texts(120, seed=7, structured=True))
    common = ["--model-name-or-path", toy_dir, "--max-steps", "3", "--per-device-batch-size", "8",
              "--logging-steps", "1", "--max-seq-length", "24"]
    mntp = str(tmp_path / "mntp")
    assert main(["mntp", "--train-file", texts, "--output-dir", mntp, "--validation-split-percentage", "10",
                 "--lora-r", "4", *common]) == 0
    assert os.path.isfile(os.path.join(mntp, "adapter_model.safetensors"))
    metrics = json.load(open(os.path.join(mntp, "metrics.json")))
    assert "eval_accuracy" in metrics and metrics["tokens"] > 0
    log = [json.loads(x) for x in open(os.path.join(mntp, "train_log.jsonl"))]
    assert any("tokens_per_second" in r for r in log)
    enc = LLM2Vec.from_pretrained(mntp)  # base + MNTP adapter, bidirectional
    assert enc.encode(["a dog runs"], convert_to_tensor=True).shape == (1, 64)

    simcse = str(tmp_path / "simcse")
    assert main(["simcse", "--train-file", texts, "--output-dir", simcse, "--peft-model-name-or-path", mntp,
                 "--mini-batch-size", "5", "--lora-r", "4", *common]) == 0
    # the SimCSE adapter only, over the base with the MNTP adapter merged (it saved the whole
    # merged model: the model's size per run instead of the adapter's)
    cfg = json.load(open(os.path.join(simcse, "llm2vec_fast_config.json")))
    assert cfg["adapter_only"] and cfg["merged_adapters"] == [os.path.abspath(mntp)]
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in os.listdir(simcse))
    enc = LLM2Vec.from_pretrained(simcse)
    e = enc.encode(["a dog runs", "the cat sits"], convert_to_tensor=True)
    assert e.shape == (2, 64) and torch.isfinite(e).all()
    by_hand = LLM2Vec.from_pretrained(toy_dir, peft_model_name_or_path=mntp, merge_peft=True)
    from peft import PeftModel

    by_hand.model = PeftModel.from_pretrained(by_hand.model, simcse)
    torch.testing.assert_close(by_hand.encode(["a dog runs", "the cat sits"], convert_to_tensor=True), e,
                               rtol=0, atol=1e-5)

    d = tmp_path / "sup"
    d.mkdir()
    for name in ("nli", "qa"):
        _write(d / f"{name}.jsonl", [json.dumps({"query": q, "positive": p, "negative": n}) for q, p, n in
                                     zip(toy_texts(20, seed=1), toy_texts(20, seed=2), toy_texts(20, seed=3))])
    instr = _write(tmp_path / "instr.json", [json.dumps({"nli": "find the same scene", "qa": "answer"})])
    sup = str(tmp_path / "supervised")
    assert main(["supervised", "--train-files", str(d), "--instructions", instr, "--output-dir", sup,
                 "--no-use-lora", *common]) == 0
    cfg = json.load(open(os.path.join(sup, "llm2vec_fast_config.json")))
    assert cfg.get("adapter_only") is not True
    assert LLM2Vec.from_pretrained(sup).encode([["answer", "a dog"]], convert_to_tensor=True).shape == (1, 64)


def test_group_by_length_keeps_batches_homogeneous():
    rows = [{"input_ids": list(range(n))} for n in (list(range(2, 40)) * 5)]
    order = arrange_batches({"t": rows}, 10, steps=15, seed=1, length=lambda r: len(r["input_ids"]))
    blocks = [order[i : i + 10] for i in range(0, len(order), 10)]
    spread = [max(len(r["input_ids"]) for r in b) - min(len(r["input_ids"]) for r in b) for b in blocks]
    assert max(spread) <= 3, spread
    firsts = [len(b[0]["input_ids"]) for b in blocks]
    assert firsts != sorted(firsts), "block order must still be shuffled"


def test_token_count_reads_the_device_only_when_logging():
    """The trainers' throughput counter sums attention-mask tokens (and a packed row's texts)
    where the tensors live and reads the sums only when asked (a log line): no host read per
    step."""
    from types import SimpleNamespace

    from torch.utils._python_dispatch import TorchDispatchMode

    from llm2vec_fast.training.trainers import _BaseTrainer

    class HostReads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("_local_scalar_dense", "item")):
                HostReads.n += 1
            return func(*args, **(kwargs or {}))

    state = SimpleNamespace(_token_sum=None, _row_sum=None, _token_count=0, _row_count=0)
    masks = [torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([[1, 0, 0]])]
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])  # position_ids of 3 texts in one row
    with HostReads():
        for m in masks:
            _BaseTrainer._count(state, {"attention_mask": m, "input_ids": torch.zeros_like(m)})
        _BaseTrainer._count(state, {"position_ids": packed, "input_ids": torch.zeros_like(packed)})
    assert HostReads.n == 0
    assert _BaseTrainer._tokens.fget(state) == 6 + 9 and _BaseTrainer._samples.fget(state) == 3 + 3


def test_seed_fixes_the_lora_init_and_the_new_mask_row(tmp_path):
    """cfg.seed, not whatever ran before, decides the LoRA weights and a new <mask> row
    (both are drawn before Trainer seeds): same seed -> same run, another seed -> another."""
    from llm2vec_fast.training.pipeline import train_mntp

    def run(global_seed, seed):
        torch.manual_seed(global_seed)
        cfg = make_config(MNTPConfig, dict(FAST, output_dir=str(tmp_path / "m"), max_steps=1, per_device_batch_size=8,
                                           use_lora=True, lora_r=4, mask_token="mask", seed=seed, backend="torch"))
        model, tr = train_mntp(toy_model(True, seed=1), toy_tokenizer(), toy_texts(40, seed=1), cfg,
                               save_checkpoints=False)
        params = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        params["mask_row"] = model.get_input_embeddings().weight[-1].detach().clone()
        return params, _losses(tr)

    a, la = run(0, seed=7)
    b, lb = run(123, seed=7)
    c, _ = run(0, seed=8)
    assert la == lb and a.keys() == b.keys() and len(a) > 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mask_row"], c["mask_row"])
    assert any(not torch.equal(a[k], c[k]) for k in a if k != "mask_row")


def test_an_mntp_adapter_with_an_added_mask_token_loads_back(tmp_path, toy_dir):
    """mask_token='mask' adds <mask> and resizes the embeddings; peft saves the resized rows
    with the adapter, so both loaders resize the base before applying it (size mismatch)."""
    from llm2vec_fast.encoder import LLM2Vec
    from llm2vec_fast.training.pipeline import load_model, run_mntp

    out = str(tmp_path / "mntp")
    run_mntp(make_config(MNTPConfig, dict(FAST, model_name_or_path=toy_dir, output_dir=out, max_steps=1,
                                          per_device_batch_size=8, lora_r=4, mask_token="mask",
                                          train_file=_write(tmp_path / "t.txt", toy_texts(40, seed=2)))))
    enc = LLM2Vec.from_pretrained(out)
    assert enc.model.get_input_embeddings().weight.shape[0] == len(enc.tokenizer) == 69
    assert torch.isfinite(enc.encode(["a <mask> dog"], convert_to_tensor=True)).all()
    for causal in (False, True):  # the SimCSE stage (and a second MNTP) load it over the base
        model, _ = load_model(toy_dir, causal_lm=causal, peft_model_name_or_path=out)
        assert model.get_input_embeddings().weight.shape[0] == 69


def test_an_in_memory_mntp_adapter_with_an_added_mask_token_saves_its_rows(tmp_path, toy_dir):
    """train_mntp on a model built in memory (no base folder for peft to read): peft's
    save_embedding_layers="auto" missed the resize and saved the adapter without the <mask>
    rows, so the folder (69-token tokenizer) could not be used (68-row base)."""
    from llm2vec_fast.training.pipeline import load_model, save_mntp_output, train_mntp

    out = str(tmp_path / "mntp")
    cfg = make_config(MNTPConfig, dict(FAST, model_name_or_path=toy_dir, output_dir=out, max_steps=1,
                                       per_device_batch_size=8, lora_r=4, mask_token="mask", backend="torch"))
    tok = toy_tokenizer()
    model, _ = train_mntp(toy_model(True, seed=3, initializer_range=0.1), tok, toy_texts(40, seed=2), cfg,
                          save_checkpoints=False)
    row = model.get_input_embeddings().weight.detach()[-1].clone()
    save_mntp_output(model, tok, cfg)
    loaded, _ = load_model(toy_dir, causal_lm=True, peft_model_name_or_path=out)
    assert loaded.get_input_embeddings().weight.shape[0] == 69
    torch.testing.assert_close(loaded.get_input_embeddings().weight[-1], row)


def test_supervised_without_hard_negatives_needs_no_negative_field(tmp_path, toy_dir):
    from llm2vec_fast.cli import main

    d = tmp_path / "sup"
    d.mkdir()
    _write(d / "qa.jsonl", [json.dumps({"query": q, "positive": p}) for q, p in
                            zip(toy_texts(20, seed=1), toy_texts(20, seed=2))])
    out = str(tmp_path / "out")
    assert main(["supervised", "--train-files", str(d), "--output-dir", out, "--no-hard-negatives", "--no-use-lora",
                 "--model-name-or-path", toy_dir, "--max-steps", "2", "--per-device-batch-size", "8",
                 "--max-seq-length", "24"]) == 0
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_text_files_split_at_newlines_only(tmp_path):
    """A form feed, U+2028 or U+0085 inside a line stays in its text (str.splitlines split there)."""
    from llm2vec_fast.training.data import read_texts

    p = tmp_path / "t.txt"
    p.write_bytes("one\x0cpage\r\ntwo\u2028lines\nthree\x85x\n\n".encode("utf-8"))
    assert read_texts(str(p)) == ["one\x0cpage", "two\u2028lines", "three\x85x"]


def test_mntp_loss_weighs_every_labelled_token_the_same_across_accumulation(tmp_path):
    """8 rows in one batch or in 2 accumulated micro-batches of 4: the same gradient step (the
    loss is the step's labelled-token mean; micro-batch means weighted alike made it differ)."""
    from llm2vec_fast.training.pipeline import train_mntp

    def run(per_device, ga):
        cfg = make_config(MNTPConfig, dict(FAST, output_dir=str(tmp_path / f"m{ga}"), max_steps=3, optim="sgd",
                                           per_device_batch_size=per_device, gradient_accumulation_steps=ga,
                                           learning_rate=0.5, use_lora=False, backend="torch", seed=4))
        model, tr = train_mntp(toy_model(True, seed=6), toy_tokenizer(), toy_texts(60, seed=6), cfg,
                               save_checkpoints=False)
        return {n: p.detach().clone() for n, p in model.named_parameters()}, _losses(tr)

    (w1, l1), (w2, l2) = run(8, 1), run(4, 2)
    assert l2 == pytest.approx(l1, rel=1e-5)
    start = dict(toy_model(True, seed=6).named_parameters())
    assert max(float((w1[k] - start[k]).abs().max()) for k in w1) > 1e-3  # training moved the weights
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)


def test_mntp_packing_trains_as_the_padded_batches_do(tmp_path):
    """packing=True: the same steps (losses, weights, evaluation) as padded batches of the same
    texts, and the throughput counts the same texts and real tokens (a packed row holds many)."""
    from llm2vec_fast.training.pipeline import train_mntp

    texts = toy_texts(70, seed=8)

    def run(packing):
        cfg = make_config(MNTPConfig, dict(FAST, output_dir=str(tmp_path / f"p{packing}"), max_steps=3, optim="sgd",
                                           per_device_batch_size=8, learning_rate=0.5, use_lora=False, backend="torch",
                                           seed=5, packing=packing))
        model, tr = train_mntp(toy_model(True, seed=7), toy_tokenizer(), texts[:60], cfg, eval_texts=texts[60:],
                               save_checkpoints=False)
        ev = [h for h in tr.state.log_history if "eval_loss" in h][-1]
        return {n: p.detach().clone() for n, p in model.named_parameters()}, _losses(tr), ev, tr._samples, tr._tokens

    (w1, l1, e1, rows1, tok1), (w2, l2, e2, rows2, tok2) = run(False), run(True)
    assert len(l1) == 3 and l2 == pytest.approx(l1, rel=1e-5)
    assert e2["eval_loss"] == pytest.approx(e1["eval_loss"], rel=1e-5)
    assert e2["eval_labelled_tokens"] == e1["eval_labelled_tokens"] > 0
    assert rows2 == rows1 == 3 * 8 and tok2 == tok1 > rows1 * 2
    start = {n: p.detach() for n, p in toy_model(True, seed=7).named_parameters()}
    assert max(float((w1[k] - start[k]).abs().max()) for k in w1) > 1e-3  # training moved the weights
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode,pooling,mbs", [("simcse", "mean", None), ("supervised", "last_token", None),
                                              ("supervised", "weighted_mean", None), ("supervised", "mean", 4)])
def test_contrastive_packing_trains_as_the_padded_batches_do(tmp_path, mode, pooling, mbs):
    """packing=True for SimCSE / supervised (queries with an instruction, hard negatives): the
    same losses and weights over 3 SGD steps as padded batches (each group pooled from its own
    token range; with GradCache, chunks of 4 texts across the groups' bounds), and the same row
    and token counts."""
    from llm2vec_fast.training.pipeline import train_contrastive

    rows = [dict(query=q, positive=p, negative=n, instruction="Find the match:") for q, p, n in
            zip(toy_texts(24, seed=1), toy_texts(24, seed=2), toy_texts(24, seed=3))]

    def run(packing):
        cls = SimCSEConfig if mode == "simcse" else SupervisedConfig
        cfg = make_config(cls, dict(FAST, output_dir=str(tmp_path / f"{mode}{packing}"), max_steps=3, optim="sgd",
                                    per_device_batch_size=6, learning_rate=0.5, use_lora=False, backend="torch",
                                    attention_dropout=0.0, temperature=0.5, pooling_mode=pooling, seed=3,
                                    packing=packing, mini_batch_size=mbs if packing else None))
        model = toy_model(False, seed=4, initializer_range=0.3, attention_dropout=0.0)
        if mode == "simcse":
            model, tr = train_contrastive(model, toy_tokenizer(), toy_texts(30, seed=6), cfg, mode="simcse",
                                          save_checkpoints=False)
        else:
            model, tr = train_contrastive(model, toy_tokenizer(), None, cfg, mode="supervised",
                                          datasets={"nli": rows}, save_checkpoints=False)
        return {n: p.detach().clone() for n, p in model.named_parameters()}, _losses(tr), tr._samples, tr._tokens

    (w1, l1, rows1, tok1), (w2, l2, rows2, tok2) = run(False), run(True)
    groups = 2 if mode == "simcse" else 3
    assert len(l1) == 3 and l2 == pytest.approx(l1, rel=1e-5)
    assert rows2 == rows1 == 3 * 6 * groups and tok2 == tok1 > rows1 * 2
    start = {n: p.detach() for n, p in toy_model(False, seed=4, initializer_range=0.3).named_parameters()}
    assert max(float((w1[k] - start[k]).abs().max()) for k in w1) > 1e-3  # training moved the weights
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)

def test_packing_defaults_on_for_contrastive_stages_on_a_patched_model():
    """SimCSE / supervised pack their batches by default (``packing`` None) when the model's
    attention is patched, and only then (an unpatched model would let a packed row's texts
    attend to each other); an explicit value wins; MNTP stays padded unless asked."""
    from llm2vec_fast import patch_model
    from llm2vec_fast.training.pipeline import resolve_packing

    for cls in (SimCSEConfig, SupervisedConfig):
        assert make_config(cls, dict(FAST, output_dir="x")).packing is None
    assert make_config(MNTPConfig, dict(FAST, output_dir="x")).packing is False
    plain = toy_model(False, seed=1)
    patched = patch_model(toy_model(False, seed=1), backend="torch")
    auto = make_config(SimCSEConfig, dict(FAST, output_dir="x"))
    assert resolve_packing(auto, patched) is True and resolve_packing(auto, plain) is False
    off = make_config(SimCSEConfig, dict(FAST, output_dir="x", packing=False))
    on = make_config(SupervisedConfig, dict(FAST, output_dir="x", packing=True))
    assert resolve_packing(off, patched) is False and resolve_packing(on, plain) is True
    assert resolve_packing(make_config(MNTPConfig, dict(FAST, output_dir="x")), patched) is False


def test_simcse_with_default_settings_trains_packed(tmp_path):
    """train_contrastive with the config's default packing (None): the pipeline patches the
    model, so the collator packs, and the steps match a packing=False run of the same texts."""
    from llm2vec_fast.training.pipeline import train_contrastive

    def run(**kw):
        cfg = make_config(SimCSEConfig, dict(FAST, output_dir=str(tmp_path / str(kw)), max_steps=2, optim="sgd",
                                             per_device_batch_size=4, learning_rate=0.5, use_lora=False,
                                             backend="torch", attention_dropout=0.0, temperature=0.5, seed=3, **kw))
        model = toy_model(False, seed=4, initializer_range=0.3, attention_dropout=0.0)
        _, tr = train_contrastive(model, toy_tokenizer(), toy_texts(12, seed=6), cfg, mode="simcse",
                                  save_checkpoints=False)
        return tr.data_collator.packed, _losses(tr)

    (p_default, l_default), (p_off, l_off) = run(), run(packing=False)
    assert p_default is True and p_off is False
    assert len(l_default) == 2 and l_default == pytest.approx(l_off, rel=1e-5)


@pytest.mark.parametrize("group", [False, True])
def test_mntp_too_few_texts_for_a_step_fails_before_the_model_loads(tmp_path, toy_dir, monkeypatch, group):
    from llm2vec_fast.training import pipeline

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input check")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    texts = _write(tmp_path / "t.txt", toy_texts(5))
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="per_device_batch_size: 16 training rows per step, but 5 training texts"):
        pipeline.run_mntp(make_config(MNTPConfig, dict(model_name_or_path=toy_dir, train_file=texts, output_dir=out,
                                                       per_device_batch_size=16, group_texts=group,
                                                       validation_split_percentage=0)))
    _no_output(out)


def test_instructions_keep_dataset_names_as_written(tmp_path):
    """Dataset names are file stems: "my-data" stays "my-data" (the config reader's '-' to '_'
    made it "my_data", which matched no file)."""
    from llm2vec_fast.training.data import load_supervised, read_instructions

    d = tmp_path / "sup"
    d.mkdir()
    _write(d / "my-data.jsonl", [json.dumps({"query": "q", "positive": "p", "negative": "n"})])
    instr = read_instructions(_write(tmp_path / "i.json", [json.dumps({"my-data": "retrieve"})]))
    assert instr == {"my-data": "retrieve"}
    data = load_supervised([str(d)], instr)
    assert list(data) == ["my-data"] and data["my-data"][0]["instruction"] == "retrieve"


def _byte_level_tokenizer():
    """A byte-level BPE with no merges: one token per UTF-8 byte (a CJK character is 3), BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.mark.parametrize("text", ["机器学习很有趣", "naïve café — déjà vu 🙂", "plain ascii words here"])
def test_mntp_group_texts_row_bound_holds_for_byte_level_tokens(tmp_path, text):
    """The pre-load check bounds the rows ``group_texts`` makes; it assumed one token per
    character, which byte-level BPE exceeds (3 tokens per CJK character), so it refused runs
    whose texts do fill a step."""
    from llm2vec_fast.training.pipeline import _check_mntp_inputs, tokenize_texts

    tok = _byte_level_tokenizer()
    texts = [text] * 10
    rows = len(tokenize_texts(tok, texts, 16, True))
    f = _write(tmp_path / "t.txt", texts)
    # exactly as many rows per step as the texts make: accepted before any model loads
    cfg = make_config(MNTPConfig, dict(train_file=f, output_dir=str(tmp_path / "o"), group_texts=True,
                                       max_seq_length=16, per_device_batch_size=rows))
    assert _check_mntp_inputs(cfg)[0] == texts
    # far more than any tokenizer can make: still refused early
    cfg = make_config(MNTPConfig, dict(train_file=f, output_dir=str(tmp_path / "o"), group_texts=True,
                                       max_seq_length=16, per_device_batch_size=10 * rows + 50))
    with pytest.raises(ValueError, match="per_device_batch_size: .* training rows per step"):
        _check_mntp_inputs(cfg)


def test_adapter_outputs_record_an_absolute_base_and_load_from_elsewhere(tmp_path, toy_dir, monkeypatch):
    """MNTP and SimCSE LoRA outputs name the base model; a relative --model-name-or-path was
    recorded as given, so the folder loaded only from the directory the run started in. The
    MNTP folder also loads as --peft over its base (LLM2Vec.from_pretrained(base, peft=...))."""
    import shutil

    from llm2vec_fast.encoder import LLM2Vec
    from llm2vec_fast.training.pipeline import run_mntp, run_simcse

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(toy_dir, work / "base")
    texts = _write(work / "t.txt", toy_texts(24, seed=7))
    monkeypatch.chdir(work)
    common = dict(FAST, model_name_or_path="base", train_file="t.txt", max_steps=1, per_device_batch_size=4,
                  lora_r=4)
    run_mntp(make_config(MNTPConfig, dict(common, output_dir="mntp")))
    run_simcse(make_config(SimCSEConfig, dict(common, output_dir="simcse")))
    for out in ("mntp", "simcse"):
        cfg = json.load(open(os.path.join(out, "llm2vec_fast_config.json")))
        assert cfg["adapter_only"] is True and cfg["base_model_name_or_path"] == str(work / "base"), cfg
    monkeypatch.chdir(tmp_path)  # elsewhere
    inputs = ["a dog runs", "the cat sits"]
    mntp = LLM2Vec.from_pretrained(str(work / "mntp")).encode(inputs, convert_to_tensor=True)
    assert LLM2Vec.from_pretrained(str(work / "simcse")).encode(inputs, convert_to_tensor=True).shape == (2, 64)
    as_peft = LLM2Vec.from_pretrained(str(work / "base"), peft_model_name_or_path=str(work / "mntp"))
    torch.testing.assert_close(as_peft.encode(inputs, convert_to_tensor=True), mntp, rtol=0, atol=1e-5)


def test_mntp_runs_with_the_largest_seed(tmp_path):
    """seed is checked to lie in [0, 2**32) (numpy's range); at the top of it the per-row mask
    seeds derived from it (training and evaluation) stay within torch's range."""
    from llm2vec_fast.training.pipeline import train_mntp

    cfg = make_config(MNTPConfig, dict(FAST, output_dir=str(tmp_path / "o"), max_steps=1, per_device_batch_size=4,
                                       use_lora=False, seed=2**32 - 1))
    texts = toy_texts(16, seed=1)
    _, trainer = train_mntp(toy_model(True, seed=0), toy_tokenizer(), texts[:12], cfg, eval_texts=texts[12:],
                            save_checkpoints=False)
    assert any("eval_accuracy" in h for h in trainer.state.log_history)
