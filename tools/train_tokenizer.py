"""Train a SentencePiece BPE tokenizer on jsonl (plain or .gz) and/or plain text files.

Writes `{output_prefix}.model` (what --tokenizer-model takes) and `{output_prefix}.vocab`.
Defaults suit mixed code and prose and make every string encodable and round-trippable:
byte fallback, identity normalisation, whitespace kept as is, runs of spaces allowed as
pieces (code indentation), digits split; unk=0, bos=1, eos=2 (the eod id), pad=3.

    python tools/train_tokenizer.py --input data/corpus/code.jsonl data/corpus/prose.jsonl \\
        --output-prefix data/tokenizer --vocab-size 8000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import sentencepiece as spm
from tqdm import tqdm

from megagrow.data.jsonl import BadLineLog, is_jsonl_path, iter_documents, require_file
from megagrow.data.tokenizer import SentencePieceTokenizer
from megagrow.errors import UserError, exit_on_user_error

# Documents reach the trainer one line at a time. Pieces then never span a line break
# (as in Llama's tokenizer), the trainer's sentence sampling works on small units, and a
# whole source file never meets SentencePiece's per-sentence length cap, which skips
# longer sentences with only a log line. Lines longer than the cap are cut into
# cap-sized parts for the same reason: their text is learned from, not dropped.
MAX_SENTENCE_BYTES = 1 << 14


@dataclass
class CorpusStats:
    """What the trainer was fed."""

    documents: int = 0
    sentences: int = 0
    bytes: int = 0
    long_lines_cut: int = 0


def _cut(line: str, max_bytes: int) -> list[str]:
    """Parts of `line` of at most `max_bytes` UTF-8 bytes, cut between characters."""
    parts, start, size = [], 0, 0
    for i, ch in enumerate(line):
        n = len(ch.encode("utf-8"))
        if size + n > max_bytes:
            parts.append(line[start:i])
            start, size = i, 0
        size += n
    parts.append(line[start:])
    return parts


def iter_texts(paths: Sequence[str], json_keys: Sequence[str], bad_lines: dict[str, BadLineLog]) -> Iterator[str]:
    """Documents of every input: the `json_keys` fields of jsonl files, the lines of text files."""
    for path in paths:
        if is_jsonl_path(path):
            log = bad_lines.setdefault(path, BadLineLog())
            for fields in iter_documents(path, json_keys, log):
                yield from fields
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from f


def iter_sentences(texts: Iterator[str], stats: CorpusStats, progress: tqdm) -> Iterator[str]:
    """Non-empty lines of every document, long ones cut, as the trainer's sentences."""
    for text in texts:
        stats.documents += 1
        progress.update(1)
        for line in text.splitlines():
            if not line.strip():
                continue
            encoded_size = len(line.encode("utf-8"))
            stats.bytes += encoded_size
            parts = [line] if encoded_size <= MAX_SENTENCE_BYTES else _cut(line, MAX_SENTENCE_BYTES)
            stats.long_lines_cut += len(parts) > 1
            stats.sentences += len(parts)
            yield from parts


def train(args: argparse.Namespace) -> tuple[CorpusStats, dict[str, BadLineLog]]:
    """Run the SentencePiece trainer over the inputs; writes the .model and .vocab files."""
    stats, bad_lines = CorpusStats(), {}
    Path(args.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(args.seed)
    print(
        f"reading {len(args.input)} input file(s); SentencePiece samples up to {args.max_sentences:,} lines, "
        f"then learns {args.vocab_size:,} BPE pieces with {args.num_threads} thread(s)",
        file=sys.stderr,
    )
    with tqdm(desc="documents read", unit=" docs", file=sys.stderr, disable=None) as progress:
        sentences = iter_sentences(iter_texts(args.input, args.json_keys, bad_lines), stats, progress)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences,
                model_prefix=args.output_prefix,
                model_type="bpe",
                vocab_size=args.vocab_size,
                character_coverage=args.character_coverage,
                input_sentence_size=args.max_sentences,
                shuffle_input_sentence=True,
                max_sentence_length=MAX_SENTENCE_BYTES,
                num_threads=args.num_threads,
                train_extremely_large_corpus=False,
                # Exact round trips for code: no Unicode normalisation, whitespace untouched,
                # no space prepended; unseen characters become UTF-8 byte pieces, never unk.
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                byte_fallback=True,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                max_sentencepiece_length=16,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=3,
                minloglevel=0 if args.verbose else 2,
            )
        except RuntimeError as err:
            if stats.sentences == 0:
                bad = [(path, log) for path, log in bad_lines.items() if log.count]
                why = f" ({bad[0][0]} line {bad[0][1].first[0][0]}: {bad[0][1].first[0][1]})" if bad else ""
                raise UserError(
                    f"no text found in {' '.join(args.input)}{why}; check --input and --json-keys"
                ) from None
            reason = str(err).strip().split("] ", 1)[-1]  # drop SentencePiece's source location
            raise UserError(f"SentencePiece training failed: {reason} For a small corpus lower --vocab-size.") from None
    return stats, bad_lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="jsonl files (.jsonl/.json, optionally .gz) and/or plain text files"
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument(
        "--vocab-size", type=int, default=32000, help="pieces in the vocabulary, special and byte pieces included"
    )
    parser.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys of jsonl records whose text is trained on"
    )
    parser.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        help="lines sampled from the corpus for training (memory and time grow with it)",
    )
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters covered by pieces; the rarest rest fall back to bytes",
    )
    parser.add_argument(
        "--num-threads", type=int, default=os.cpu_count() or 1, help="trainer threads (default: CPU count)"
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of SentencePiece's sentence sampling")
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        parser.error(f"--vocab-size {args.vocab_size} is too small: 256 byte pieces and 4 special pieces need room")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> SentencePieceTokenizer:
    """Train, then load the result to check it and print a summary."""
    args = parse_args(argv)
    for path in args.input:
        require_file(path, "input file")
    start = time.perf_counter()
    stats, bad_lines = train(args)
    tokenizer = SentencePieceTokenizer(f"{args.output_prefix}.model")
    for path, log in bad_lines.items():
        if log.count:
            print(log.report(path), file=sys.stderr)
    print(
        f"read {stats.documents:,} documents, {stats.sentences:,} lines, {stats.bytes / 1e6:.1f} MB"
        + (f" ({stats.long_lines_cut:,} long lines cut)" if stats.long_lines_cut else "")
        + (f"; trained on a random {args.max_sentences:,} lines" if stats.sentences > args.max_sentences else "")
        + f"; {time.perf_counter() - start:.1f}s\n"
        f"wrote {args.output_prefix}.model and {args.output_prefix}.vocab: vocab_size={tokenizer.vocab_size} "
        f"unk={tokenizer.unk_id} bos={tokenizer.bos_id} eos/eod={tokenizer.eos_id} pad={tokenizer.pad_id}"
    )
    return tokenizer


if __name__ == "__main__":
    main()
