"""Cluster schedulers (SLURM)."""
