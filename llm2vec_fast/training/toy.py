"""A toy setting for smoke runs and tests: a word-level tokenizer, a tiny random Llama, texts.

The tokenizer is a real ``PreTrainedTokenizerFast`` (offsets, special tokens, BOS added),
so every code path of the pipeline (collators, the encoder's tokenisation, saving and
loading) runs in seconds on a CPU. Nothing here is meant to learn anything useful.
"""
from __future__ import annotations

import random

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = (
    "a the man woman dog cat child plane car train boat bird horse guitar flute piano soccer ball "
    "is are was plays playing rides riding eats eating runs running sings singing sits sitting "
    "taking off on in with near under over big small red blue green old young happy quickly slowly "
    "street park field river house kitchen table water food music game"
).split()


def toy_tokenizer():
    """Word-level fast tokenizer: ids 0-3 are <pad>, <s>, </s>, <unk>; BOS is prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + ["_", "."])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.padding_side = "right"
    return tok


def toy_model(causal_lm: bool = True, *, seed: int = 0, vocab_size: int | None = None, **overrides):
    """A 2-layer Llama (C = 64, GQA 4/2 heads) with random weights from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    kw = dict(vocab_size=vocab_size or (len(SPECIALS) + len(WORDS) + 2), hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = (LlamaForCausalLM if causal_lm else LlamaModel)(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model


def toy_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 12, structured: bool = False) -> list[str]:
    """``n`` sentences over the toy vocabulary: random words, or with ``structured`` runs of
    consecutive words of a fixed cyclic order (every token predictable from its neighbours,
    so a few MNTP steps visibly lower the loss)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        if structured:
            s = rng.randrange(len(WORDS))
            out.append(" ".join(WORDS[(s + j) % len(WORDS)] for j in range(k)))
        else:
            out.append(" ".join(rng.choice(WORDS) for _ in range(k)))
    return out
