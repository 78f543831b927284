#!/usr/bin/env bash
# Real text from this machine -> SentencePiece tokenizer -> Megatron datasets, sized for a CPU example.
#   OUT=runs/gstack_cpu bash examples/gstack_cpu/prepare_data.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/gstack_cpu}
BYTES_PER_DOMAIN=${BYTES_PER_DOMAIN:-2000000}
VOCAB_SIZE=${VOCAB_SIZE:-2000}
if [ -f "$OUT/data/code_text_document.idx" ] && [ -f "$OUT/data/prose_text_document.idx" ]; then
    echo "data already in $OUT/data"; exit 0
fi
python tools/build_corpus.py --output-dir "$OUT/corpus" --max-bytes-per-domain "$BYTES_PER_DOMAIN" \
    --domains code prose
python tools/train_tokenizer.py --input "$OUT"/corpus/*.jsonl --output-prefix "$OUT/tokenizer" \
    --vocab-size "$VOCAB_SIZE" --max-sentences 100000
for domain in code prose; do
    python tools/preprocess_data.py --input "$OUT/corpus/$domain.jsonl" --output-prefix "$OUT/data/$domain" \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
        --append-eod --workers 1 --log-interval 5000
done
