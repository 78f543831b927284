#!/usr/bin/env bash
# G_stack on CPU: a 2-layer base grown x2 and x4 during training, beside scratch runs of the
# 4- and 8-layer models with the same total tokens; writes a table (tokens and FLOPs to reach scratch) and
# loss_vs_tokens_and_flops.png.
#   bash examples/gstack_cpu/run.sh            (about 2 minutes on 2 idle cores)
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/gstack_cpu}
ITERS=${ITERS:-300}              # x 8 sequences x 128 tokens = 307k tokens per run
GROW_ITERS=${GROW_ITERS:-75}     # the base trains 25% of the tokens before growing
EVAL_INTERVAL=15
TOKENS_PER_ITER=$(( 8 * 128 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT="$OUT" bash examples/gstack_cpu/prepare_data.sh
D="$OUT/data"
rm -rf "$OUT/runs"

# Every run: the same data, batch and LR schedule (cosine over the whole run); only the model differs.
train() {  # train NAME NUM_LAYERS [extra flags]
    local name=$1 layers=$2; shift 2
    echo "== $name: $layers layers $*"
    python pretrain_gpt.py --num-layers "$layers" --hidden-size 128 --ffn-hidden-size 352 \
        --num-attention-heads 4 --num-query-groups 2 --seq-length 128 --tokenizer-model "$OUT/tokenizer.model" \
        --data-path 0.5 "$D/code_text_document" 0.5 "$D/prose_text_document" --split 95,5,0 \
        --micro-batch-size 8 --global-batch-size 8 --train-iters "$ITERS" \
        --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 15 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \
        --eval-interval "$EVAL_INTERVAL" --eval-iters 4 --log-interval "$EVAL_INTERVAL" --metrics-file "$OUT/runs/$name.jsonl" "$@" \
        2>&1 | grep -E "validation|growing|error" || true
}

train scratch_4L 4
train scratch_8L 8
# x2 in one command: base to GROW_ITERS, grow (Adam moments stacked too), continue.
train gstack_x2 2 --grow-at-tokens $(( GROW_ITERS * TOKENS_PER_ITER )) --growth-factor 2 --stack-optimizer-state \
    --save "$OUT/runs/gstack_x2"
# x4 by the two-step recipe, from the same base checkpoint: stack offline, then resume.
python tools/stack_checkpoint.py --load "$OUT/runs/gstack_x2" --iteration "$GROW_ITERS" \
    --save "$OUT/runs/gstack_x4" --growth-factor 4 --stack-optimizer-state --no-progress-bar
grep '"kind": "valid"' "$OUT/runs/gstack_x2.jsonl" | head -n $(( GROW_ITERS / EVAL_INTERVAL )) > "$OUT/runs/gstack_x4.jsonl"
train gstack_x4 8 --load "$OUT/runs/gstack_x4" --save "$OUT/runs/gstack_x4"

python examples/gstack_cpu/report.py --runs "$OUT/runs" \
    --grow-iteration "$GROW_ITERS" --plot "$OUT/loss_vs_tokens_and_flops.png"
