"""Small real text and a tiny tokenizer trained on it, built once per test session.

tests/conftest.py registers this module as a pytest plugin, so any test can ask for
`small_corpus` or `tiny_tokenizer_model` by name. Results are cached in this module, so
every test module of a session shares one corpus and one tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = REPO_ROOT / "tools"
TINY_VOCAB_SIZE = 600
_CORPUS_BYTES_PER_DOMAIN = 120_000
_cache: dict[str, object] = {}


def load_tool(name: str) -> ModuleType:
    """Import tools/{name}.py as a module (tools/ is not a package), registered so workers can unpickle from it."""
    module_name = f"megagrow_tool_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, TOOLS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def run_tool(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run `python tools/{name}.py args...` from the repository root, capturing text output."""
    return subprocess.run(
        [sys.executable, str(TOOLS_DIR / f"{name}.py"), *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        **kwargs,
    )


def call_quietly(main, argv: list[str]):
    """Call a tool's main(argv) with its stdout swallowed; returns main's result."""
    with contextlib.redirect_stdout(io.StringIO()):
        return main([str(a) for a in argv])


def read_jsonl_texts(path: Path, key: str = "text") -> list[str]:
    """The `key` field of every line of a jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Directory with code.jsonl and prose.jsonl: about 120 KB each of the Python standard library."""
    if "corpus" not in _cache:
        out = tmp_path_factory.mktemp("corpus")
        call_quietly(
            load_tool("build_corpus").main,
            [
                "--output-dir",
                out,
                "--domains",
                "code",
                "prose",
                "--max-bytes-per-domain",
                _CORPUS_BYTES_PER_DOMAIN,
                "--max-doc-bytes",
                30_000,
            ],
        )
        _cache["corpus"] = out
    return _cache["corpus"]


@pytest.fixture(scope="session")
def tiny_tokenizer_model(small_corpus, tmp_path_factory) -> Path:
    """A 600-piece BPE model trained on the small corpus; returns the .model path."""
    if "tokenizer" not in _cache:
        prefix = tmp_path_factory.mktemp("tokenizer") / "tiny"
        call_quietly(
            load_tool("train_tokenizer").main,
            [
                "--input",
                small_corpus / "code.jsonl",
                small_corpus / "prose.jsonl",
                "--output-prefix",
                prefix,
                "--vocab-size",
                TINY_VOCAB_SIZE,
                "--num-threads",
                1,
            ],
        )
        _cache["tokenizer"] = Path(f"{prefix}.model")
    return _cache["tokenizer"]
