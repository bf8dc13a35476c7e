"""Training loops of the Shapes-world models and of the fine-tuned methods."""
