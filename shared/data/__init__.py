"""The preprocess stage: readers for CSV/JSONL exports, text cleaning, de-duplication with the
best-reply rule, the train/dev/test split, and the chat-conversation schema every later stage reads."""
