"""Compute kernels: no I/O, no pipeline logic. One file per operation."""
