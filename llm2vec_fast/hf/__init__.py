"""Hugging Face integration: :func:`patch_model` / :func:`unpatch_model` (bidirectional attention).

Nothing here is imported at ``import llm2vec_fast``; ``llm2vec_fast.hf.patch`` imports
transformers only when a model is patched.
"""
