"""patch_model on the real SmolLM2-135M (Llama, 30 layers, C = 576, 9 heads / 3 K/V heads).

The model is loaded once for the module (about 20 s) in float64, so padding invariance can
be held to 1e-9 of the largest hidden value. Texts are short: a float64 forward of 30
layers on the CPU is slow.
"""
from __future__ import annotations

import pytest
import torch

from llm2vec_fast.hf.patch import patch_model, unpatch_model

TEXTS = ["The cat sat on the mat.", "Bidirectional attention", "A slightly longer sentence about encoders and text."]


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    try:
        from llm2vec_fast.models import load_default_model

        model, tok = load_default_model(dtype=torch.float32)
        # Converted after loading: asked for float64, transformers keeps GGUF weights packed and
        # runs float32 matmul kernels; float32 loading de-quantises into plain nn.Linear weights.
        model = model.to(torch.float64)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"the default model is not installed: {e}")
    yield model, tok
    unpatch_model(model)


def encode(tok, texts, side):
    tok.padding_side = side
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def run(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_smollm2_patch_is_bidirectional_and_unpatch_exact(smol):
    model, tok = smol
    unpatch_model(model)
    ids, mask = encode(tok, TEXTS, "left")
    before = run(model, ids, mask)
    last = ids.clone()
    last[:, -1] = (last[:, -1] + 1) % model.config.vocab_size  # left padding: column -1 is every row's last token
    first_valid = mask.argmax(dim=1)
    rows = torch.arange(len(TEXTS))
    changed_causal = run(model, last, mask)[rows, first_valid]
    assert torch.equal(changed_causal, before[rows, first_valid])
    single = ids[2:3, first_valid[2]:]
    single_before = run(model, single)[0, 0]

    patch_model(model)
    after = run(model, ids, mask)
    changed = run(model, last, mask)[rows, first_valid]
    scale = float(after.abs().max())
    assert float((changed - after[rows, first_valid]).abs().amax(dim=-1).min()) > 1e-6 * scale
    single2 = single.clone()
    single2[0, -1] = (single2[0, -1] + 1) % model.config.vocab_size
    assert not torch.allclose(run(model, single)[0, 0], run(model, single2)[0, 0])  # batch size 1, no mask

    unpatch_model(model)
    assert torch.equal(run(model, ids, mask), before)
    assert torch.equal(run(model, single)[0, 0], single_before)


def test_smollm2_padding_invariance_float64(smol):
    model, tok = smol
    patch_model(model)
    ids_l, mask_l = encode(tok, TEXTS, "left")
    ids_r, mask_r = encode(tok, TEXTS, "right")
    h_l, h_r = run(model, ids_l, mask_l), run(model, ids_r, mask_r)
    for b in range(len(TEXTS)):
        alone_ids = ids_r[b:b + 1, : int(mask_r[b].sum())]
        alone = run(model, alone_ids)[0]
        tol = 1e-9 * float(alone.abs().max())
        assert float((h_l[b][mask_l[b].bool()] - alone).abs().max()) <= tol
        assert float((h_r[b][mask_r[b].bool()] - alone).abs().max()) <= tol
