"""Tokenizers by Megatron's --tokenizer-type, and the SentencePiece one megagrow trains.

    SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer
                          a SentencePiece .model (SentencePieceTokenizer below). megatron-core
                          0.16 builds all three the same way: no BOS added, eod = the eos id,
                          vocab = the model's pieces. (Megatron's --legacy-tokenizer classes
                          differed: Llama2Tokenizer prepended BOS, SentencePieceTokenizer added
                          <CLS>/<SEP>/<EOD>/<MASK> pieces; megagrow follows the default.)
    HuggingFaceTokenizer  a local tokenizer.json (megagrow/data/hf_tokenizer.py)
    NullTokenizer         no text: ids written as whitespace-separated integers, for --mock-data
                          runs; --vocab-size ids plus one eod id after them, as Megatron

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


class NullTokenizer:
    """Megatron's NullTokenizer: text is whitespace-separated ids below vocab_size; eod is vocab_size itself."""

    def __init__(self, vocab_size: int | None):
        if vocab_size is None or vocab_size < 1:
            raise UserError("--tokenizer-type NullTokenizer needs --vocab-size N (its ids are 0..N-1, and N is eod)")
        self._ids_below = int(vocab_size)

    def encode(self, text: str) -> list[int]:
        """The integers written in `text`."""
        try:
            return [int(word) for word in text.split()]
        except ValueError:
            raise UserError("NullTokenizer reads text made of whitespace-separated integer ids only") from None

    def decode(self, ids: Sequence[int]) -> str:
        """The ids written out, separated by spaces."""
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        """The given ids and the eod id after them."""
        return self._ids_below + 1

    @property
    def eod(self) -> int:
        """End-of-document id: the first id after the given vocabulary."""
        return self._ids_below


_SENTENCEPIECE_TYPES = (TOKENIZER_TYPE, "GPTSentencePieceTokenizer", "Llama2Tokenizer")
HUGGINGFACE_TYPE = "HuggingFaceTokenizer"
NULL_TYPE = "NullTokenizer"
TOKENIZER_TYPES = (*_SENTENCEPIECE_TYPES, HUGGINGFACE_TYPE, NULL_TYPE)
_REFUSED_TYPES = {
    "GPT2BPETokenizer": "save GPT-2's vocab.json and merges.txt as a tokenizer.json (tokenizers' ByteLevelBPETokenizer"
                        "(vocab, merges).save) and use --tokenizer-type HuggingFaceTokenizer",
    "TikTokenizer": "megagrow has no tiktoken reader; use the model's tokenizer.json with HuggingFaceTokenizer",
    "BertWordPieceLowerCase": "megagrow pre-trains decoder-only Llama models, not BERT",
    "BertWordPieceCase": "megagrow pre-trains decoder-only Llama models, not BERT",
    "MultimodalTokenizer": "megagrow pre-trains text-only models",
    "NullMultimodalTokenizer": "megagrow pre-trains text-only models",
    "SFTTokenizer": "megagrow does pre-training, not supervised fine-tuning with prompt formats",
}


def check_tokenizer_type(tokenizer_type: str) -> None:
    """Raise UserError, with the reason, unless megagrow reads this --tokenizer-type."""
    if tokenizer_type in _REFUSED_TYPES:
        raise UserError(f"--tokenizer-type {tokenizer_type} is not supported: {_REFUSED_TYPES[tokenizer_type]}")
    if tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(f"--tokenizer-type {tokenizer_type} is not a Megatron tokenizer megagrow knows; choose one "
                        f"of {', '.join(TOKENIZER_TYPES)}")


def build_tokenizer(tokenizer_type: str, model_path: str | os.PathLike | None, vocab_size: int | None = None):
    """The tokenizer named by Megatron's --tokenizer-type/--tokenizer-model (and --vocab-size for NullTokenizer)."""
    check_tokenizer_type(tokenizer_type)
    if tokenizer_type == NULL_TYPE:
        return NullTokenizer(vocab_size)
    if not model_path:
        what = "a directory holding tokenizer.json" if tokenizer_type == HUGGINGFACE_TYPE else "the .model file"
        raise UserError(f"--tokenizer-model is required with --tokenizer-type {tokenizer_type}; pass {what}")
    if tokenizer_type == HUGGINGFACE_TYPE:
        from megagrow.data.hf_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(model_path)
    return SentencePieceTokenizer(model_path)
