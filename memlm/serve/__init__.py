"""memlm.serve."""
