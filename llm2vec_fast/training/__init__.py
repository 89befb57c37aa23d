"""Training recipes on the Hugging Face Trainer: MNTP, SimCSE, supervised contrastive, GradCache.

- ``config``: one dataclass per stage, from flags or a JSON/YAML file.
- ``data``: text files, supervised JSONL datasets, batches arranged one dataset at a time.
- ``collators``: MNTP masking (80/10/10 or all-mask) and contrastive batches.
- ``gradcache``: the chunked contrastive step (batch size independent of memory).
- ``trainers``: model wrappers and ``Trainer`` subclasses.
- ``pipeline``: ``run_mntp`` / ``run_simcse`` / ``run_supervised`` (files in, model out).

Importing this package imports transformers (the trainers do); ``import llm2vec_fast``
does not import it.
"""
