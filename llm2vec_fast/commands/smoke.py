"""``llm2vec-fast smoke``: load the default model and embed two sentences (a set-up check)."""
from __future__ import annotations

HELP = "load SmolLM2-135M offline and print the cosine similarity of two embedded sentences"


def add_arguments(p):
    p.add_argument("--a", default="A plane is taking off.")
    p.add_argument("--b", default="An air plane is taking off.")


def run(args) -> int:
    import torch

    from llm2vec_fast import load_default_model, pool

    model, tok = load_default_model()
    batch = tok([args.a, args.b], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    emb = pool(hidden, batch["attention_mask"], mode="mean", normalize=True)
    print(f"cosine({args.a!r}, {args.b!r}) = {float(emb[0] @ emb[1]):.4f}")
    return 0
