"""Reproductions of the paper's small experiments (supplementary C), importable and runnable from the CLI."""
