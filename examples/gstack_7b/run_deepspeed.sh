#!/usr/bin/env bash
# Gstack 7B recipe with the deepspeed launcher over the nodes of ./hostfile.
#   DATA="0.7 /data/web_text_document 0.3 /data/code_text_document" TOKENIZER=/data/tok.model \
#   OUT=/checkpoints/gstack7b bash examples/gstack_7b/run_deepspeed.sh [in-run|base|grow|grown]
# in-run (the default): one job that trains the base, grows it x4 on every rank and goes on to 300B tokens.
# base, grow, grown: the same in three steps, for a grown layout the base's job cannot hold.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=examples/gstack_7b
: "${DATA:?set DATA to a --data-path value}" "${TOKENIZER:?set TOKENIZER to a SentencePiece .model}"
OUT=${OUT:-runs/gstack_7b}
STEP=${1:-in-run}
LAUNCH=(deepspeed --hostfile "$HERE/hostfile" pretrain_gpt.py)
COMMON=(--tokenizer-model "$TOKENIZER" --data-path $DATA --deepspeed --tensorboard-dir "$OUT/tensorboard")

case "$STEP" in
  in-run)  # base to d = 10B tokens, G_stack x4 with the Adam state, grown to 300B; relaunch the same line to resume
    "${LAUNCH[@]}" --config "$HERE/in_run.yaml" --deepspeed_config "$HERE/ds_zero1.json" "${COMMON[@]}" \
        --save "$OUT/in_run" --load "$OUT/in_run" --metrics-file "$OUT/in_run_metrics.jsonl" ;;
  base)   # 1. the 8-layer base model on d = 10B tokens, ZeRO-1 data parallel over every GPU
    "${LAUNCH[@]}" --config "$HERE/base.yaml" --deepspeed_config "$HERE/ds_zero1.json" "${COMMON[@]}" \
        --save "$OUT/base_ds" --load "$OUT/base_ds" --metrics-file "$OUT/base_metrics.jsonl" ;;
  grow)   # 2. the base checkpoint (Megatron-LM's format, whatever the ZeRO stage) stacked x4 into step 3's tp=2
    python tools/stack_checkpoint.py --load "$OUT/base_ds" --save "$OUT/grown_init" --growth-factor 4 \
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1 ;;
  grown)  # 3. the 32-layer model from the stacked weights, tp=2 x ZeRO-1
    "${LAUNCH[@]}" --config "$HERE/grown.yaml" --deepspeed_config "$HERE/ds_zero1.json" "${COMMON[@]}" \
        --load "$OUT/grown_init" --save "$OUT/grown_ds" --metrics-file "$OUT/grown_metrics.jsonl" ;;
  *) echo "usage: $0 [in-run|base|grow|grown]" >&2; exit 2 ;;
esac
