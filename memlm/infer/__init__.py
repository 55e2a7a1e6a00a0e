"""memlm.infer."""
