"""Batch collators for MNTP and contrastive training.

Shapes: ``B`` examples in a batch, ``T`` tokens (padded length), ``G`` groups of rows in a
contrastive batch (SimCSE: 2 views; supervised: queries, positives and optionally hard
negatives), so a contrastive batch has ``G * B`` rows, group-major.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def resolve_mask_token(tokenizer, choice: str, model=None) -> int:
    """The id used to mask selected tokens.

    ``"_"``: the blank token the LLM2Vec recipe used for Llama / Mistral: the vocabulary's
    ``_`` token, as the recipe's ``tokenizer.mask_token = "_"`` gives (else the text ``_``
    when it is one token, else the tokenizer's own mask token, else EOS); ``"eos"``: the
    EOS token; ``"mask"``: the tokenizer's mask token, else a new ``<mask>`` special token
    is added and ``model``'s embeddings are resized to the new vocabulary.
    """
    if choice == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError("mask_token: 'eos' chosen but the tokenizer has no EOS token")
        return int(tokenizer.eos_token_id)
    if choice == "_":
        tid = tokenizer.convert_tokens_to_ids("_")
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(tid) == "_":
            return tid  # the vocabulary token (a SentencePiece tokenizer turns the text "_" into "▁_")
        ids = tokenizer("_", add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
        if tokenizer.mask_token_id is not None:
            return int(tokenizer.mask_token_id)
        return int(tokenizer.eos_token_id)
    if choice == "mask":
        if tokenizer.mask_token_id is None:
            tokenizer.add_special_tokens({"mask_token": "<mask>"})
            if model is not None:
                emb = model.get_input_embeddings()
                if emb.weight.shape[0] < len(tokenizer):
                    model.resize_token_embeddings(len(tokenizer))
        return int(tokenizer.mask_token_id)
    raise ValueError(f"mask_token: expected '_', 'eos' or 'mask', got {choice!r}")


def pad_ids(seqs: list[list[int]], pad_id: int, pad_to_multiple_of: int | None = None):
    """Right-pad token lists: ``input_ids (B, T)`` int64 and ``attention_mask (B, T)`` int64."""
    T = max((len(s) for s in seqs), default=0)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pack_rows(mask: torch.Tensor, **rows: torch.Tensor) -> dict:
    """The padding-free form of a right-padded batch: each ``(B, T)`` tensor of ``rows`` as its
    real tokens in one ``(1, N)`` row (row after row), plus ``position_ids`` ``(1, N)``
    restarting at 0 at each row's first token (where the patched attention starts a new
    sequence). ``mask``: ``(B, T)`` 0 / 1, right-padded."""
    keep = mask.bool()
    out = {k: v[keep][None] for k, v in rows.items()}
    out["position_ids"] = (mask.cumsum(1) - 1)[keep][None]
    return out


class MNTPCollator:
    """Pads pre-tokenised texts and selects tokens for masked next-token prediction.

    Each example is ``{"input_ids": list[int]}``. Returns ``input_ids``, ``attention_mask``
    and ``labels`` ``(B, T)`` int64, and ``num_labelled`` (an int: how many labels, counted
    here so the loss needs no host sync to find them). A token is selected with probability
    ``mlm_probability`` unless it is padding, a special token (BOS / EOS / pad / any
    registered special id) or the first token of its row (with the shift by one, nothing
    predicts position 0). ``labels`` holds the original id at selected positions and -100
    elsewhere; the loss predicts ``labels[:, t]`` from the hidden state at ``t - 1``.

    ``mask_strategy="80-10-10"`` replaces 80% of the selected tokens by ``mask_token_id``,
    10% by a random non-special token and keeps 10%; ``"all"`` masks every selected token.
    Randomness: per example from its ``mask_seed`` when every example has one (the training
    pipeline sets it, so a resumed run masks exactly as the uninterrupted one), else
    torch's global generator, or ``generator`` when given.

    ``packed=True`` returns a padding-free batch instead: the examples' tokens one after
    another in a single row, ``input_ids`` / ``labels`` / ``position_ids`` ``(1, N)`` with N
    the examples' total length, positions restarting at 0 at each example and no
    ``attention_mask``; a model patched by :func:`llm2vec_fast.patch_model` attends within
    each example (the variable-length kernels). Masks and labels are those of the padded
    batch (the same draws), and no example's first token is selected, so with the shift by
    one no example's token is predicted from the one before it.
    """

    def __init__(self, tokenizer, mask_token_id: int, mlm_probability: float = 0.2,
                 mask_strategy: str = "80-10-10", pad_to_multiple_of: int | None = None, generator=None,
                 packed: bool = False):
        if not (0.0 < mlm_probability < 1.0):
            raise ValueError(f"mlm_probability: expected a float in (0, 1), got {mlm_probability!r}")
        if mask_strategy not in ("80-10-10", "all"):
            raise ValueError(f"mask_strategy: expected '80-10-10' or 'all', got {mask_strategy!r}")
        self.tokenizer = tokenizer
        self.mask_token_id = int(mask_token_id)
        self.mlm_probability = float(mlm_probability)
        self.mask_strategy = mask_strategy
        self.pad_to_multiple_of = pad_to_multiple_of
        self.generator = generator
        self.packed = bool(packed)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad)
        specials = set(int(i) for i in tokenizer.all_special_ids) | {self.pad_id}
        # added tokens flagged special too (SmolLM2's <repo_name>..., Llama-3's reserved ones),
        # which all_special_ids leaves out: never selected, never drawn as a random token
        specials |= {int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                     if getattr(t, "special", False)}
        self.special_ids = torch.tensor(sorted(specials), dtype=torch.long)
        vocab = len(tokenizer)
        keep = torch.ones(vocab, dtype=torch.bool)
        keep[self.special_ids[self.special_ids < vocab]] = False
        self.random_pool = torch.nonzero(keep).flatten()  # ids a "random token" may take

    def _uniforms(self, examples, T):
        """Three ``(B, T)`` uniform draws (selection, 80/10/10 split, random token).

        Examples carrying an integer ``mask_seed`` get draws from their own generator, so
        their masks depend on nothing else: not on the batch they land in, the rank that
        reads them, or a checkpoint resume. Otherwise torch's global generator (or
        ``generator``) is used, as in transformers' MLM collator.
        """
        B = len(examples)
        if all("mask_seed" in e for e in examples):
            u = torch.ones((3, B, T))
            for i, e in enumerate(examples):
                g = torch.Generator().manual_seed(int(e["mask_seed"]))
                n = len(e["input_ids"])
                u[:, i, :n] = torch.rand((3, n), generator=g)
            return u[0], u[1], u[2]
        u = torch.rand((3, B, T), generator=self.generator)
        return u[0], u[1], u[2]

    def __call__(self, examples: list[dict]) -> dict:
        ids, mask = pad_ids([list(e["input_ids"]) for e in examples], self.pad_id, self.pad_to_multiple_of)
        u_sel, u_kind, u_tok = self._uniforms(examples, ids.shape[1])
        eligible = mask.bool() & ~torch.isin(ids, self.special_ids)
        eligible[:, 0] = False
        selected = eligible & (u_sel < self.mlm_probability)
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        inputs = ids.clone()
        if self.mask_strategy == "all":
            inputs[selected] = self.mask_token_id
        else:
            to_mask = selected & (u_kind < 0.8)
            to_random = selected & (u_kind >= 0.8) & (u_kind < 0.9)
            inputs[to_mask] = self.mask_token_id
            pick = (u_tok * len(self.random_pool)).long().clamp_max(len(self.random_pool) - 1)
            inputs[to_random] = self.random_pool[pick[to_random]]
        # counted here, on the host, so the loss finds the labelled rows without a host sync
        # (masked_linear_cross_entropy's num_labelled; position 0 is never labelled, so the
        # loss's one-token shift keeps every label, packed rows included)
        n_labelled = int(selected.sum())
        if self.packed:
            return pack_rows(mask, input_ids=inputs, labels=labels) | {"num_labelled": n_labelled}
        return {"input_ids": inputs, "attention_mask": mask, "labels": labels, "num_labelled": n_labelled}


class ContrastiveCollator:
    """Tokenises contrastive examples into one padded batch of ``G * B`` rows.

    SimCSE (``mode="simcse"``): examples ``{"text": str}``; the batch is the texts twice
    (rows ``[0, B)`` and ``[B, 2B)``), so one forward pass with dropout gives two views.
    Supervised (``mode="supervised"``): examples ``{"query", "positive", "negative",
    "instruction"}``; rows are queries (instruction prepended, attended to but outside
    ``embed_mask``), then positives, then hard negatives when ``hard_negatives``.

    Tokenisation is the encoder's (:meth:`llm2vec_fast.LLM2Vec.tokenize`), so training sees
    exactly what inference will. Returns ``input_ids``, ``attention_mask``, ``position_ids``,
    ``embed_mask`` ``(G * B, T)``.

    ``packed=True`` returns the same rows padding-free: ``input_ids``, ``position_ids``
    (restarting at 0 at each text) and ``embed_mask`` ``(1, N)``, N the rows' total length, no
    ``attention_mask``; ``cu_seqlens`` ``(G, B + 1)`` int32, each group's text offsets counted
    from the group's first token; ``group_bounds``, the ``G + 1`` token offsets of the groups
    (a list of ints: slicing by them needs no device read).
    """

    def __init__(self, tokenizer, *, mode: str = "simcse", max_length: int = 128, pooling_mode: str = "mean",
                 hard_negatives: bool = True, packed: bool = False):
        from ..encoder import LLM2Vec

        if mode not in ("simcse", "supervised"):
            raise ValueError(f"mode: expected 'simcse' or 'supervised', got {mode!r}")
        self.mode = mode
        self.hard_negatives = hard_negatives
        self.packed = bool(packed)
        self.tokenizer = tokenizer
        # A model-less encoder: only its tokenisation is used.
        self._enc = LLM2Vec(None, tokenizer, pooling_mode=pooling_mode, max_length=max_length,
                            doc_max_length=max_length, skip_instruction=True, padding_side="right")

    @property
    def n_groups(self) -> int:
        return 2 if self.mode == "simcse" or not self.hard_negatives else 3

    def __call__(self, examples: list[dict]) -> dict:
        if self.mode == "simcse":
            feats = self._enc.tokenize([e["text"] for e in examples])
            feats = {k: torch.cat([v, v], 0) for k, v in feats.items()}
        else:
            rows = [[e.get("instruction", ""), e["query"]] for e in examples]
            rows += [["", e["positive"]] for e in examples]
            if self.hard_negatives:
                rows += [["", e["negative"]] for e in examples]
            feats = self._enc.tokenize(rows)
        feats["attention_mask"] = feats["attention_mask"].long()
        return self._pack(feats) if self.packed else feats

    def _pack(self, feats: dict) -> dict:
        mask = feats["attention_mask"]
        lengths = mask.sum(1).view(self.n_groups, -1)  # (G, B): the rows are G groups of B
        cu = torch.zeros((lengths.shape[0], lengths.shape[1] + 1), dtype=torch.int32)
        cu[:, 1:] = lengths.cumsum(1)
        bounds = [0] + lengths.sum(1).cumsum(0).tolist()
        return pack_rows(mask, input_ids=feats["input_ids"], embed_mask=feats["embed_mask"]) | {
            "cu_seqlens": cu, "group_bounds": bounds}
