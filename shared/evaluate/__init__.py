"""The evaluate stage: batched generation (transformers or vLLM), ROUGE/BLEU on jieba words,
the quality gate and the before/after report."""
