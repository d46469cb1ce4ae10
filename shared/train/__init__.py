"""The finetune stage: base-model resolution (hub, S3, folder, bundled), chat tokenisation
with assistant-only labels, packing, and the LoRA Trainer loop with checkpoints, resume and the
best checkpoint. The GPU fast path plugs into the loop's hooks from ``train.fast``."""
