#!/usr/bin/env bash
# TinyLlama's pre-training mix, tokenized on a SLURM cluster: SlimPajama (jsonl.zst, key
# "text") and StarCoderData (parquet, column "content") at 7:3. Two preprocessing arrays
# run side by side; the merge job starts when both have finished every task.
# Replace the paths; the array sizes are the number of nodes-worth of work per corpus.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=examples/preprocess_slurm
TOKENIZER=${TOKENIZER:-/path/to/tokenizer.model}
SLIMPAJAMA=${SLIMPAJAMA:-/path/to/SlimPajama-627B}
STARCODERDATA=${STARCODERDATA:-/path/to/starcoderdata}
OUT=${OUT:-/path/to/tokenized}

slim=$(sbatch --parsable --array=0-63 \
    --export=ALL,INPUT="$SLIMPAJAMA/train/chunk*/*.jsonl.zst",JSON_KEY=text,OUT="$OUT/slimpajama",TOKENIZER="$TOKENIZER" \
    "$HERE/preprocess_array.sbatch")
star=$(sbatch --parsable --array=0-31 \
    --export=ALL,INPUT="$STARCODERDATA",JSON_KEY=content,OUT="$OUT/starcoderdata",TOKENIZER="$TOKENIZER" \
    "$HERE/preprocess_array.sbatch")
sbatch --dependency="afterok:$slim:$star" \
    --export=ALL,CORPORA="0.7:$OUT/slimpajama:text 0.3:$OUT/starcoderdata:content",MIX="$OUT/tinyllama.mix" \
    "$HERE/merge.sbatch"
