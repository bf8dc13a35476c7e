"""Generation backbones (Janus-Pro through transformers) and image-tokenizer access."""
