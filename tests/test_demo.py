"""The demo pipeline end to end on the toy model (seconds): table, saved encoder that loads."""
from __future__ import annotations

import json
import os

import pytest
import torch


def test_demo_toy_runs_and_saves_a_loadable_encoder(tmp_path, capsys):
    from llm2vec_fast.cli import main
    from llm2vec_fast.encoder import LLM2Vec

    out = str(tmp_path / "demo")
    assert main(["demo", "--toy", "--output-dir", out, "--mntp-steps", "3", "--simcse-steps", "3",
                 "--mntp-batch-size", "8", "--simcse-batch-size", "8", "--max-seq-length", "16"]) == 0
    text = capsys.readouterr().out
    for stage in ("causal, mean pooling", "bidirectional, untrained", "after MNTP", "after SimCSE", "total"):
        assert stage in text
    res = json.load(open(os.path.join(out, "demo_results.json")))
    assert set(res["scores"]) >= {"causal, mean pooling", "after SimCSE"}
    assert len(res["scores"]["simcse_losses"]) == 3
    assert not os.path.exists(os.path.join(out, "_stages"))
    enc = LLM2Vec.from_pretrained(out)
    assert enc.pooling_mode == "mean" and enc._is_patched()
    e = enc.encode(["a dog runs", "a man plays the guitar"], convert_to_tensor=True)
    assert e.shape == (2, 64) and torch.isfinite(e).all()


def test_demo_rejects_bad_settings(tmp_path):
    from llm2vec_fast.cli import main

    out = str(tmp_path / "demo")
    with pytest.raises(SystemExit, match="simcse-batch-size"):
        main(["demo", "--toy", "--output-dir", out, "--simcse-batch-size", "1"])
    with pytest.raises(SystemExit, match="mntp-steps"):
        main(["demo", "--toy", "--output-dir", out, "--mntp-steps", "-1"])
    assert not os.path.exists(out)


def test_demo_toy_runs_without_scipy(tmp_path):
    """scipy is not a dependency: the demo's scoring runs in a process that cannot import it."""
    import subprocess
    import sys

    out = str(tmp_path / "demo")
    argv = ["demo", "--toy", "--output-dir", out, "--mntp-steps", "1", "--simcse-steps", "1",
            "--mntp-batch-size", "8", "--simcse-batch-size", "8", "--max-seq-length", "16", "--threads", "1"]
    code = f"import sys; sys.modules['scipy'] = None; from llm2vec_fast.cli import main; sys.exit(main({argv!r}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.load(open(os.path.join(out, "demo_results.json")))["scores"]
    assert all(isinstance(scores[k], float) for k in ("causal, mean pooling", "after SimCSE"))
