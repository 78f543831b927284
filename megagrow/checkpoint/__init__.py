"""Offline checkpoint work: tensor-parallel layout of every weight, resharding, HF Llama interop.

These modules operate on *full* state dicts: the LlamaModel state dict as it would be at
tp=1 and pp=1, with the vocabulary unpadded (`vocab_size` rows). Padding and splitting for a
given tp happen only when a sharded checkpoint is written, so one full state dict serves
every layout and HF's unpadded matrices map onto it directly.
"""
