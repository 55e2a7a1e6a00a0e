"""memlm.eval."""
