"""Tensor, sequence, pipeline and data parallelism: process groups, communication ops, sharded layers."""
