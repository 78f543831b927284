"""SentencePiece tokenizer: the one tokenizer type megagrow reads and writes datasets with.

Models trained by tools/train_tokenizer.py round-trip exactly (`decode(encode(t)) == t`):
identity normalisation, no dummy prefix, byte fallback for characters outside the
vocabulary. The one exception is SentencePiece's own: the character U+2581 ("▁") stands
for a space inside the model, so it decodes as a space.
"""

from __future__ import annotations

import os
from typing import Sequence

import sentencepiece as spm

from megagrow.errors import UserError

TOKENIZER_TYPE = "SentencePieceTokenizer"


class SentencePieceTokenizer:
    """Wraps a SentencePiece `.model` file; pickles as its path, so worker processes reload it cheaply."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = str(model_path)
        if not os.path.isfile(self.model_path):
            raise UserError(
                f"tokenizer model not found: {self.model_path}; pass the .model file written by "
                f"tools/train_tokenizer.py (--tokenizer-model)"
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except (OSError, RuntimeError) as err:
            raise UserError(
                f"{self.model_path} is not a SentencePiece model ({str(err).strip() or type(err).__name__}); "
                f"pass the .model file (not .vocab) written by tools/train_tokenizer.py"
            ) from None

    def __reduce__(self):
        return type(self), (self.model_path,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_path!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added)."""
        try:
            return self._sp.encode(text)
        except RuntimeError:
            text.encode("utf-8")  # SentencePiece's error for a lone surrogate is opaque; this one names it
            raise

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; control ids (bos, eos, pad) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id, for inspection."""
        return self._sp.id_to_piece(int(token_id))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ones included."""
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the model has none."""
        return _defined(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None when the model has none."""
        return _defined(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None when the model has none."""
        return _defined(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (SentencePiece requires one)."""
        return self._sp.unk_id()

    @property
    def eod(self) -> int:
        """End-of-document id appended by preprocessing with --append-eod: the eos id."""
        if self.eos_id is None:
            raise UserError(
                f"{self.model_path} defines no eos piece, so --append-eod has no id to append; "
                f"retrain the tokenizer with an eos id or drop --append-eod"
            )
        return self.eos_id


def _defined(token_id: int) -> int | None:
    """SentencePiece reports a disabled special piece as -1."""
    return None if token_id < 0 else token_id


def build_tokenizer(tokenizer_type: str, model_path: str | os.PathLike | None) -> SentencePieceTokenizer:
    """The tokenizer named by Megatron's --tokenizer-type/--tokenizer-model flags."""
    if tokenizer_type != TOKENIZER_TYPE:
        raise UserError(
            f"--tokenizer-type {tokenizer_type} is not supported; megagrow supports only "
            f"--tokenizer-type {TOKENIZER_TYPE} (train one with tools/train_tokenizer.py)"
        )
    if not model_path:
        raise UserError(f"--tokenizer-model is required with --tokenizer-type {TOKENIZER_TYPE}; pass the .model file")
    return SentencePieceTokenizer(model_path)
