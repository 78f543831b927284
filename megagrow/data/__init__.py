"""Token datasets: Megatron's indexed format, GPT samples, blending, tokenizer, samplers."""

# Fail on import, with instructions, when the C++ extension was not built.
from megagrow.data import native  # noqa: F401
