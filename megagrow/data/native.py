"""The compiled index builders (megagrow._helpers), with one clear error when they are missing."""

try:
    from megagrow._helpers import build_blending_indices, build_sample_idx
except ImportError as err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "megagrow's C++ helpers (megagrow._helpers) are not built: run `pip install -e .` "
        "(or `pip install .`) from the repository root; it needs a C++17 compiler and pybind11"
    ) from err

__all__ = ["build_blending_indices", "build_sample_idx"]
