#!/usr/bin/env bash
# Three real domains from this machine -> one SentencePiece tokenizer -> one Megatron dataset per domain.
#   OUT=runs/bimix_cpu bash examples/bimix_cpu/prepare_data.sh      (skips work already done)
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/bimix_cpu}
BYTES_PER_DOMAIN=${BYTES_PER_DOMAIN:-2000000}   # code and prose are capped; legal is ~240 kB in total
VOCAB_SIZE=${VOCAB_SIZE:-2000}                  # small vocabulary: the embedding dominates a tiny model's cost
DOMAINS=(code prose legal)
if [ ! -d /usr/share/common-licenses ]; then
    echo "error: /usr/share/common-licenses is missing, so build_corpus.py has no 'legal' domain; this example needs a Debian-like system" >&2
    exit 1
fi
done_marker="$OUT/data/legal_text_document.idx"
if [ -f "$done_marker" ]; then echo "data already in $OUT/data"; exit 0; fi

python tools/build_corpus.py --output-dir "$OUT/corpus" --max-bytes-per-domain "$BYTES_PER_DOMAIN" \
    --domains "${DOMAINS[@]}"
# One tokenizer for all domains, so that losses in nats per token compare across mixtures.
python tools/train_tokenizer.py --input "$OUT"/corpus/*.jsonl --output-prefix "$OUT/tokenizer" \
    --vocab-size "$VOCAB_SIZE" --max-sentences 100000
for domain in "${DOMAINS[@]}"; do
    python tools/preprocess_data.py --input "$OUT/corpus/$domain.jsonl" --output-prefix "$OUT/data/$domain" \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
        --append-eod --workers 1 --log-interval 5000
done
