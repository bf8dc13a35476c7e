"""The Shapes world: a procedurally rendered miniature of the paper's setting (see README)."""
