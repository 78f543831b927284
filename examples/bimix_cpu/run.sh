#!/usr/bin/env bash
# BiMix on CPU: three real domains (code, prose, legal), three ways to choose the mixture, compared at
# the same number of training tokens:
#   uniform  1/3 each (the baseline)
#   entropy  tools/mixture.py entropy (conditional-entropy proxy, no training run)
#   fitted   tools/mixture.py fit on FIT_RUNS short runs of varied mixtures, its optimum at FINAL_ITERS
# Writes runs/bimix_cpu/ (git-ignored) and copies results.md, curves.png and fit.png next to this script.
#   bash examples/bimix_cpu/run.sh                 (about 15 minutes on 2 shared cores, one seed)
#   SEEDS="1 2" bash examples/bimix_cpu/run.sh     (adds a second seed of the three final runs;
#                                                    finished runs are kept, FRESH=1 starts over)
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-runs/bimix_cpu}
FIT_ITERS=${FIT_ITERS:-120}      # short runs the law is fitted on
FINAL_ITERS=${FINAL_ITERS:-250}  # x 8 sequences x 128 tokens = 256k tokens per final run
FIT_EVAL=20                      # 6 points per fit run and domain
FINAL_EVAL=50
SEEDS=${SEEDS:-1}
FIT_SEED=$(echo "$SEEDS" | awk '{print $1}')  # fit runs share the first seed's validation sets
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
HERE=examples/bimix_cpu
started=$(date +%s)

OUT="$OUT" bash "$HERE/prepare_data.sh"
D="$OUT/data"
[ "${FRESH:-0}" = 1 ] && rm -rf "$OUT/fit" "$OUT/final"
prefix() { echo "$D/${1}_text_document"; }

# One tiny Llama, 1 process with 2 OpenMP threads: measured on the 2 cores while idle, it trains at
# ~13,500 tokens/s against ~9,100 for a 2-stage pipeline under torchrun (2 processes x 1 thread; the
# pipeline's bubble and send/recv cost more than the second process gains at this size).
# Constant LR after warm-up, for every run: with a cosine schedule a short fit run's curve would bend
# towards its own end and the law (a function of the step alone) could not be extrapolated from the
# fit runs' steps to FINAL_ITERS. With a constant LR a fit run is exactly the start of a longer run.
train() {  # train DIR ITERS EVAL_INTERVAL SEED w1 w2 w3   (weights of code, prose, legal)
    local dir=$1 iters=$2 eval=$3 seed=$4 wc=$5 wp=$6 wl=$7
    if [ -f "$dir/done" ]; then echo "== $dir: already done"; return; fi
    rm -rf "$dir"; mkdir -p "$dir"
    echo "== $dir: $iters iterations, seed $seed, code=$wc prose=$wp legal=$wl"
    local t0=$(date +%s)
    python pretrain_gpt.py --num-layers 4 --hidden-size 128 --ffn-hidden-size 352 \
        --num-attention-heads 4 --num-query-groups 2 --seq-length 128 --tokenizer-model "$OUT/tokenizer.model" \
        --data-path "$wc" "$(prefix code)" "$wp" "$(prefix prose)" "$wl" "$(prefix legal)" --split 90,10,0 \
        --micro-batch-size 8 --global-batch-size 8 --train-iters "$iters" --seed "$seed" \
        --lr 2e-3 --lr-warmup-iters 10 --lr-decay-style constant --weight-decay 0.1 --clip-grad 1.0 \
        --eval-interval "$eval" --eval-iters 6 --log-interval "$eval" --metrics-file "$dir/metrics.jsonl" \
        > "$dir/log.txt" 2>&1 || { tail -n 20 "$dir/log.txt" >&2; echo "error: training $dir failed (log: $dir/log.txt)" >&2; exit 1; }
    grep -E "validation at" "$dir/log.txt" | tail -n 1 | sed 's/^.*validation/  validation/'
    echo "  $(( $(date +%s) - t0 )) s" | tee "$dir/done"
}

echo "== entropy proxy: conditional entropy H(X'|X) per domain, the same sample size for each"
# legal has ~85k tokens in all, so every domain is sampled at 80k tokens: plug-in entropies are
# biased by sample size, and unequal samples would tilt the weights (see megagrow/mixing/entropy.py).
python tools/mixture.py entropy --data-path "$(prefix code)" "$(prefix prose)" "$(prefix legal)" \
    --max-tokens 80000 | tee "$OUT/entropy.txt"
ENTROPY_PATH=$(tail -n 1 "$OUT/entropy.txt")

echo "== fit runs: $FIT_ITERS iterations each; every domain gets at least 2 different proportions"
train "$OUT/fit/code_heavy"  "$FIT_ITERS" "$FIT_EVAL" "$FIT_SEED" 0.6  0.2  0.2
train "$OUT/fit/prose_heavy" "$FIT_ITERS" "$FIT_EVAL" "$FIT_SEED" 0.2  0.6  0.2
train "$OUT/fit/legal_heavy" "$FIT_ITERS" "$FIT_EVAL" "$FIT_SEED" 0.2  0.2  0.6
train "$OUT/fit/legal_light" "$FIT_ITERS" "$FIT_EVAL" "$FIT_SEED" 0.45 0.45 0.1

echo "== BiMix fit, optimum at step $FINAL_ITERS (extrapolated from step <= $FIT_ITERS)"
python tools/mixture.py fit --runs "$OUT"/fit/*/metrics.jsonl --target-step "$FINAL_ITERS" \
    --min-step "$FIT_EVAL" --plot "$OUT/fit.png" | tee "$OUT/fit.txt"
FITTED_PATH=$(tail -n 1 "$OUT/fit.txt")

# "--data-path w1 p1 w2 p2 w3 p3" -> "w1 w2 w3". Both tools print the domains in the order they were
# given (entropy: its --data-path; fit: the runs' --data-path), i.e. code, prose, legal.
weights_of() { echo "$1" | awk '{print $2, $4, $6}'; }
for seed in $SEEDS; do
    echo "== final runs, seed $seed: $FINAL_ITERS iterations each, the same tokens for every mixture"
    train "$OUT/final/seed$seed/uniform" "$FINAL_ITERS" "$FINAL_EVAL" "$seed" 0.333334 0.333333 0.333333
    train "$OUT/final/seed$seed/entropy" "$FINAL_ITERS" "$FINAL_EVAL" "$seed" $(weights_of "$ENTROPY_PATH")
    train "$OUT/final/seed$seed/fitted"  "$FINAL_ITERS" "$FINAL_EVAL" "$seed" $(weights_of "$FITTED_PATH")
done

python "$HERE/report.py" --final-dir "$OUT/final" --fit-dir "$OUT/fit" --min-step "$FIT_EVAL" --plot "$OUT/curves.png" \
    | tee "$OUT/results.md"
cp "$OUT/results.md" "$OUT/curves.png" "$OUT/fit.png" "$HERE/"
echo "total $(( $(date +%s) - started )) s; copied results.md, curves.png and fit.png to $HERE/"
