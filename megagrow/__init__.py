"""megagrow: Megatron-style pre-training of Llama models, with model growth and data mixing."""

__version__ = "0.1.0"
