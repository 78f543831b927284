#!/usr/bin/env bash
# Train a small Llama on 2 CPU processes (pipeline parallel, 2 stages) on the real
# multi-domain text that examples/quickstart_cpu.sh prepared, and show the loss falling.
#   DATA=runs/quickstart ITERS=300 [RUN_DIR=...] bash examples/pretrain_tiny_cpu.sh
# On a GPU node the same flags scale: raise the model (--model-preset tinyllama-1.1b),
# --nproc-per-node, --tensor-model-parallel-size and add --bf16.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-runs/quickstart}
RUN_DIR=${RUN_DIR:-$DATA/pretrain_tiny}
ITERS=${ITERS:-300}
NPROC=${NPROC:-2}
D="$DATA/data"

torchrun --nproc-per-node "$NPROC" pretrain_gpt.py \
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4 --num-query-groups 2 \
    --seq-length 128 --tokenizer-model "$DATA/tokenizer.model" \
    --data-path 0.5 "$D/code_text_document" 0.5 "$D/prose_text_document" --split 90,10,0 \
    --pipeline-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 16 \
    --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters $(( ITERS / 10 )) --lr-decay-style cosine \
    --weight-decay 0.1 --clip-grad 1.0 --eval-interval 100 --eval-iters 4 --log-interval 20 \
    --save "$RUN_DIR/checkpoints" --save-interval 100 --metrics-file "$RUN_DIR/metrics.jsonl"

python tools/metrics_summary.py "$RUN_DIR/metrics.jsonl"
echo "checkpoints: $RUN_DIR/checkpoints   metrics: $RUN_DIR/metrics.jsonl"
