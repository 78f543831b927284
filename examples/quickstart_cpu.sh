#!/usr/bin/env bash
# CPU quickstart: real corpus from this machine -> tokenizer -> Megatron datasets -> 2-process training.
# Every step prints its outputs; re-running rebuilds everything under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/quickstart}
BYTES_PER_DOMAIN=${BYTES_PER_DOMAIN:-3000000}
VOCAB_SIZE=${VOCAB_SIZE:-8000}
WORKERS=${WORKERS:-2}
mkdir -p "$OUT"

echo "== 1/5 corpus: Python standard library (code, docstring prose) and any Debian text packages"
python tools/build_corpus.py --output-dir "$OUT/corpus" --max-bytes-per-domain "$BYTES_PER_DOMAIN"

echo "== 2/5 tokenizer: SentencePiece BPE, vocab $VOCAB_SIZE"
python tools/train_tokenizer.py --input "$OUT"/corpus/*.jsonl --output-prefix "$OUT/tokenizer" \
    --vocab-size "$VOCAB_SIZE" --max-sentences 300000

echo "== 3/5 preprocess: one Megatron .bin/.idx dataset per domain"
for corpus in "$OUT"/corpus/*.jsonl; do
    domain=$(basename "$corpus" .jsonl)
    python tools/preprocess_data.py --input "$corpus" --output-prefix "$OUT/data/$domain" \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
        --append-eod --workers "$WORKERS" --log-interval 2000
done

echo "== 4/5 statistics"
prefixes=()
for index in "$OUT"/data/*_text_document.idx; do prefixes+=("${index%.idx}"); done
python tools/dataset_stats.py "${prefixes[@]}"

echo "== 5/5 train a small Llama on 2 processes (pipeline parallel) for ${ITERS:-200} iterations"
DATA="$OUT" RUN_DIR="$OUT/pretrain_tiny" ITERS=${ITERS:-200} bash examples/pretrain_tiny_cpu.sh
