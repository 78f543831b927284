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


HF_SPECIAL_TOKENS = ("<|endoftext|>", "<|begin_of_text|>")
HF_BPE_MERGES_VOCAB = 800
HF_ADDED_TOKENS = ("<|reserved_0|>", "<|reserved_1|>")
LARGE_VOCAB_FILLER = 66_000  # ids below this are filler words; the corpus's own words come after


def _save_hf_tokenizer(tokenizer, tmp_path_factory, name: str) -> Path:
    """tokenizer.json plus the tokenizer_config.json naming its eos/bos, cached under `name`; returns the directory."""
    directory = tmp_path_factory.mktemp(name)
    tokenizer.save(str(directory / "tokenizer.json"))
    # What transformers (and Megatron through it) reads the eos/bos names from.
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": HF_SPECIAL_TOKENS[0],
        # As Llama-2's files write it: an AddedToken record, not a plain string.
        "bos_token": {"__type": "AddedToken", "content": HF_SPECIAL_TOKENS[1], "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False}}))
    _cache[name] = directory
    return directory


@pytest.fixture(scope="session")
def tiny_hf_tokenizer_dir(small_corpus, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json (Llama-3 style: BOS post-processor, added tokens) trained on the small corpus."""
    if "hf_tokenizer" not in _cache:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=HF_BPE_MERGES_VOCAB, special_tokens=list(HF_SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        texts = read_jsonl_texts(small_corpus / "code.jsonl") + read_jsonl_texts(small_corpus / "prose.jsonl")
        tokenizer.train_from_iterator(texts, trainer)
        bos = HF_SPECIAL_TOKENS[1]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
        tokenizer.add_tokens(list(HF_ADDED_TOKENS))
        _save_hf_tokenizer(tokenizer, tmp_path_factory, "hf_tokenizer")
    return _cache["hf_tokenizer"]


@pytest.fixture(scope="session")
def large_hf_tokenizer_dir(small_corpus, tmp_path_factory) -> Path:
    """A word-level tokenizer.json of more than 65,500 ids in which every word of the corpus has an id >= 66,000.

    Generated filler words take the low ids, so real text encodes only to ids that need
    int32 storage (Megatron's uint16 holds ids below 65,500).
    """
    if "large_hf_tokenizer" not in _cache:
        import re

        from tokenizers import Tokenizer, models, pre_tokenizers

        words = sorted({word for path in ("code.jsonl", "prose.jsonl")
                        for text in read_jsonl_texts(small_corpus / path) for word in re.findall(r"\w+|[^\w\s]", text)})
        vocab = {f"filler{i}": i for i in range(LARGE_VOCAB_FILLER)}
        for word in ("[UNK]", *HF_SPECIAL_TOKENS, *words):
            vocab.setdefault(word, len(vocab))
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.add_special_tokens(list(HF_SPECIAL_TOKENS))
        _save_hf_tokenizer(tokenizer, tmp_path_factory, "large_hf_tokenizer")
    return _cache["large_hf_tokenizer"]
