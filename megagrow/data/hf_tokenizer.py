"""Megatron's --tokenizer-type HuggingFaceTokenizer, read from a local `tokenizer.json` with `tokenizers`.

Semantics are megatron-core 0.16's (its default, non-legacy tokenizer, which
tools/preprocess_data.py and pretrain_gpt.py build):

    ids         the text's tokens without special tokens (no BOS: the tokenizer's
                post-processor is not applied), as AutoTokenizer.tokenize + convert_tokens_to_ids
    vocab_size  every id the tokenizer knows, added tokens included (len(AutoTokenizer))
    eod         the id of the tokenizer's eos_token (from tokenizer_config.json, else
                special_tokens_map.json; a tokenizer without one falls back to its sep_token)

`transformers` is not needed: the eos/bos/pad names that transformers reads from the
json files beside tokenizer.json are read here directly. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from megagrow.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
# Where transformers keeps the names of the special tokens, in the order it reads them.
_SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _tokenizer_file(model: str) -> Path:
    path = Path(model)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        if not Path(model).exists():
            raise UserError(f"--tokenizer-model {model}: no such local directory; megagrow reads a directory holding "
                            f"{TOKENIZER_FILE} and downloads nothing (fetch it first, e.g. huggingface-cli download)")
        raise UserError(f"--tokenizer-model {model}: no {TOKENIZER_FILE} there; HuggingFaceTokenizer needs the fast "
                        f"tokenizer's {TOKENIZER_FILE} (a SentencePiece tokenizer.model goes with "
                        f"--tokenizer-type GPTSentencePieceTokenizer)")
    return path


def _token_name(value) -> str | None:
    """A special token as the json files write it: a string, or an AddedToken dict with its content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_token_names(directory: Path) -> dict[str, str]:
    """{'eos_token': '</s>', ...} from tokenizer_config.json, completed by special_tokens_map.json."""
    names: dict[str, str] = {}
    for file_name in _SPECIAL_TOKEN_FILES:
        path = directory / file_name
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: cannot read it as JSON ({err}); fix or remove the file") from None
        for key in ("eos_token", "bos_token", "pad_token", "sep_token"):
            name = _token_name(values.get(key)) if isinstance(values, dict) else None
            if name is not None:
                names.setdefault(key, name)
    return names


class HuggingFaceTokenizer:
    """A fast tokenizer's tokenizer.json; pickles as its path, so worker processes reload it cheaply."""

    def __init__(self, model: str | os.PathLike):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("--tokenizer-type HuggingFaceTokenizer needs the tokenizers package: "
                            "pip install tokenizers") from None
        self.model = str(model)
        path = _tokenizer_file(self.model)
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            raise UserError(f"{path}: not a tokenizers tokenizer.json ({str(err).splitlines()[0]})") from None
        self._vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        highest = max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
        if highest >= self._vocab_size:
            raise UserError(f"{path}: token id {highest} is beyond its {self._vocab_size} tokens (the ids have gaps); "
                            f"an embedding of that many rows could not hold it, renumber the vocabulary")
        names = _special_token_names(path.parent)
        if "eos_token" not in names and "sep_token" in names:
            names["eos_token"] = names["sep_token"]  # as megatron-core: a sep-only tokenizer ends documents with sep
        self._special_ids = {key: self._id_of(name, key, path) for key, name in names.items()}

    def _id_of(self, name: str, key: str, path: Path) -> int:
        token_id = self._tokenizer.token_to_id(name)
        if token_id is None:
            raise UserError(f"{path.parent}: its {key} {name!r} is not in {TOKENIZER_FILE}; fix the tokenizer files")
        return token_id

    def __reduce__(self):
        return type(self), (self.model,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; special tokens decode to nothing."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, for inspection."""
        return self._tokenizer.id_to_token(int(token_id))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the tokenizer names none."""
        return self._special_ids.get("bos_token")

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None when the tokenizer names none."""
        return self._special_ids.get("eos_token")

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None when the tokenizer names none."""
        return self._special_ids.get("pad_token")

    @property
    def eod(self) -> int:
        """End-of-document id appended by preprocessing with --append-eod: the eos id."""
        if self.eos_id is None:
            raise UserError(f"{self.model} names no eos_token (tokenizer_config.json or special_tokens_map.json), so "
                            f"--append-eod has no id to append; add \"eos_token\" to tokenizer_config.json or drop "
                            f"--append-eod")
        return self.eos_id
