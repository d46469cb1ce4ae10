"""The GPU fast path for training: varlen attention, fused LoRA, chunked head+loss, Liger
kernels and FP8 frozen linears. It implements ``shared.train.training.Hooks``; the training loop
never imports it."""
