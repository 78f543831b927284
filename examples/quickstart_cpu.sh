#!/usr/bin/env bash
# CPU quickstart, the whole pipeline on this machine's own text:
#   corpus -> tokenizer -> Megatron datasets -> entropy mixture -> 2-process base training (pipeline parallel)
#   -> G_stack x2 into a tensor-parallel layout -> continued training -> HF export + generation -> report.
# Every step prints its outputs; re-running rebuilds everything under $OUT.
# Knobs (environment): OUT, BYTES_PER_DOMAIN, VOCAB_SIZE, WORKERS, ITERS (whole run, default 200), GROW_AT
# (iteration of the growth, default ITERS/2), EVAL_INTERVAL, SCRATCH=0 to skip the scratch run beside the grown one,
# SEEDS=3 to repeat the grown/scratch comparison with 2 more seeds and print how it moves (how far one seed can be
# trusted; each extra seed adds a grown and a scratch run, about 1 minute on 2 idle cores).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/quickstart}
BYTES_PER_DOMAIN=${BYTES_PER_DOMAIN:-3000000}
# A 2000-piece vocabulary keeps the embeddings to 41% of the 4-layer model's parameters. Growth adds layers, not
# embeddings: with 8000 pieces (73%) the grown run never caught up with scratch in 200 iterations
# (README, "What the quickstart shows").
VOCAB_SIZE=${VOCAB_SIZE:-2000}
WORKERS=${WORKERS:-2}
ITERS=${ITERS:-200}
# Growing half-way put the grown run ahead of scratch on every seed tried; at a quarter of the run it was ahead on 4
# seeds of 5, at an eighth behind (README, "What the quickstart shows").
GROW_AT=${GROW_AT:-$(( ITERS / 2 ))}
EVAL_INTERVAL=${EVAL_INTERVAL:-$(( GROW_AT / 4 > 0 ? GROW_AT / 4 : 1 ))}  # divides GROW_AT: the base ends on an evaluation
SCRATCH=${SCRATCH:-1}
SEEDS=${SEEDS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 processes on 2 cores: one thread each
# Progress bars on a terminal, not as \r-joined fragments in a log file (transformers reads the hub's switch).
bars=(); [[ -t 2 ]] || { bars=(--no-progress-bar); export HF_HUB_DISABLE_PROGRESS_BARS=1; }
STEPS=8

if ! python -c "import transformers, safetensors" 2>/dev/null; then
    echo "error: step 7 loads the exported model with transformers; install the hf extra: pip install -e '.[hf]'" >&2
    exit 2
fi
if (( GROW_AT < 1 || GROW_AT >= ITERS )); then
    echo "error: GROW_AT=$GROW_AT must lie between 1 and ITERS-1 ($(( ITERS - 1 ))); the base trains GROW_AT iterations" >&2
    exit 2
fi
if (( SEEDS > 1 )) && [[ "$SCRATCH" == 0 ]]; then
    echo "error: SEEDS=$SEEDS repeats the grown/scratch comparison, which SCRATCH=0 skips; drop one of them" >&2
    exit 2
fi
mkdir -p "$OUT"
rm -rf "$OUT/base" "$OUT"/grown* "$OUT"/scratch* "$OUT/hf"

echo "== 1/$STEPS corpus: Python standard library (code, docstring prose), licence texts and any Debian text packages"
python tools/build_corpus.py --output-dir "$OUT/corpus" --max-bytes-per-domain "$BYTES_PER_DOMAIN"

echo "== 2/$STEPS tokenizer: SentencePiece BPE, vocab $VOCAB_SIZE"
python tools/train_tokenizer.py --input "$OUT"/corpus/*.jsonl --output-prefix "$OUT/tokenizer" \
    --vocab-size "$VOCAB_SIZE" --max-sentences 300000

echo "== 3/$STEPS preprocess: one Megatron .bin/.idx dataset per domain, $WORKERS workers"
prefixes=()
for corpus in "$OUT"/corpus/*.jsonl; do
    domain=$(basename "$corpus" .jsonl)
    python tools/preprocess_data.py --input "$corpus" --output-prefix "$OUT/data/$domain" \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
        --append-eod --workers "$WORKERS" --log-interval 2000
    prefixes+=("$OUT/data/${domain}_text_document")
done
python tools/dataset_stats.py "${prefixes[@]}"

echo "== 4/$STEPS mixture: domain weights from each domain's conditional token entropy (BiMix's training-free proxy)"
python tools/mixture.py entropy --data-path "${prefixes[@]}" --max-tokens 2000000 --mix-file "$OUT/mixture.txt"

# One model family for every run: hidden 128, 4 heads in 2 KV groups, seq 128; 16 sequences per iteration.
# The LR schedule spans all ITERS iterations in every run, so the grown run continues the base's schedule.
train() {  # train RUN_DIR [pretrain_gpt.py flags...]
    local run=$1; shift
    torchrun --standalone --nproc-per-node 2 pretrain_gpt.py \
        --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4 --num-query-groups 2 \
        --seq-length 128 --tokenizer-model "$OUT/tokenizer.model" --data-path "@$OUT/mixture.txt" --split 90,10,0 \
        --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" \
        --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters $(( ITERS / 10 )) --lr-decay-style cosine \
        --weight-decay 0.1 --clip-grad 1.0 --eval-interval "$EVAL_INTERVAL" --eval-iters 4 --log-interval "$EVAL_INTERVAL" \
        --save "$run/checkpoints" --metrics-file "$run/metrics.jsonl" "$@"
}

echo "== 5/$STEPS base: 2 layers on 2 processes (pipeline parallel, one layer per stage), iterations 1-$GROW_AT of $ITERS"
train "$OUT/base" --num-layers 2 --pipeline-model-parallel-size 2 --exit-interval "$GROW_AT"
python tools/metrics_summary.py "$OUT/base/metrics.jsonl"
echo "base checkpoint: $OUT/base/checkpoints (iteration $GROW_AT, layout tp=1 pp=2)"

echo "== 6/$STEPS grow: G_stack x2 (layers 0 1 -> 0 1 0 1) into tp=2 pp=1, Adam moments stacked too; continue to $ITERS"
python tools/stack_checkpoint.py --load "$OUT/base/checkpoints" --save "$OUT/grown/checkpoints" --growth-factor 2 \
    --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1 --stack-optimizer-state "${bars[@]}"
train "$OUT/grown" --num-layers 4 --tensor-model-parallel-size 2 --sequence-parallel --load "$OUT/grown/checkpoints"
python tools/metrics_summary.py "$OUT/grown/metrics.jsonl"
echo "grown checkpoint: $OUT/grown/checkpoints (iteration $ITERS, 4 layers, layout tp=2 pp=1)"

if [[ "$SCRATCH" != 0 ]]; then
    echo "   beside it: the 4-layer model from scratch on the same $ITERS iterations (tensor parallel, 2 processes)"
    train "$OUT/scratch" --num-layers 4 --tensor-model-parallel-size 2 --sequence-parallel
fi
seed_pairs=()
for (( seed = 1235; seed < 1234 + SEEDS; seed++ )); do
    echo "   seed $seed: base grown in the run (--grow-at-tokens), beside scratch, both with --seed $seed"
    train "$OUT/grown_seed$seed" --num-layers 2 --seed $seed --grow-at-tokens $(( GROW_AT * 16 * 128 )) \
        --growth-factor 2 --stack-optimizer-state > "$OUT/grown_seed$seed.log" 2>&1
    train "$OUT/scratch_seed$seed" --num-layers 4 --tensor-model-parallel-size 2 --sequence-parallel --seed $seed \
        > "$OUT/scratch_seed$seed.log" 2>&1
    seed_pairs+=("$OUT/grown_seed$seed/metrics.jsonl" "$OUT/scratch_seed$seed/metrics.jsonl")
done

echo "== 7/$STEPS export the grown model to an HF Llama directory and generate from it with transformers"
python tools/convert_checkpoint.py to-hf --load "$OUT/grown/checkpoints" --save "$OUT/hf"
python tools/generate_hf.py --hf-dir "$OUT/hf" --tokenizer-model "$OUT/tokenizer.model" --prompt "def " \
    --max-new-tokens 24

echo "== 8/$STEPS report"
scratch_flags=()
if [[ "$SCRATCH" != 0 ]]; then
    scratch_flags=(--scratch "$OUT/scratch/metrics.jsonl" --scratch-label "scratch: 4 layers, tp=2")
    (( ${#seed_pairs[@]} == 0 )) || scratch_flags+=(--seed-pairs "${seed_pairs[@]}")
fi
python examples/quickstart_report.py --base "$OUT/base/metrics.jsonl" --base-label "base: 2 layers, pp=2" \
    --grown "$OUT/grown/metrics.jsonl" --grown-label "grown x2: 4 layers, tp=2" "${scratch_flags[@]}" \
    --plot "$OUT/loss_vs_tokens_and_flops.png" --summary "$OUT/summary.md"
echo "outputs under $OUT: corpus/ tokenizer.model data/ mixture.txt base/ grown/ hf/ loss_vs_tokens_and_flops.png" \
     "summary.md"
