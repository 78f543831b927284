"""Stock Megatron launch scripts' flags: every one is honoured, or refused with one line naming it.

The argument lines below are copied from the scripts (only their shell variables are given
small CPU values) and split as bash would split them:

- microsoft/Megatron-DeepSpeed examples_deepspeed/pretrain_llama2_distributed.sh, commit
  f4157bea69f3df8c6cb66f2ebcda66ba03d1288e (the file last changed in 73029edfa88f).
- Megatron-LM examples/llama/train_llama2.sh, commit 3b9414b2a59120894d1445530d3318a65c92f00c
  (NVIDIA/Megatron-LM pull request 3318's head: the AMD ROCm Megatron-LM variant of the script).
- NVIDIA/Megatron-LM examples/llama/train_llama3_8b_h100_fp8.sh and examples/gpt3/
  train_gpt3_175b_distributed.sh, commit d98e8a64dd0f (main, 2026).
"""

import datetime
import json
import multiprocessing as mp
import os
import re
import shlex
import subprocess
import sys
from string import Template

import pytest
from distributed_harness import free_port

from megagrow.arguments import parse_args
from megagrow.errors import UserError
from megagrow.training.optimization import lr_schedule_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- microsoft/Megatron-DeepSpeed examples_deepspeed/pretrain_llama2_distributed.sh --------------------------

DEEPSPEED_LLAMA2 = r"""
       --tensor-model-parallel-size $TP \
       --pipeline-model-parallel-size $PP \
       --num-layers $NUM_LAYERS \
       --hidden-size $HIDDEN_SIZE \
       --ffn-hidden-size $FFN_HIDDEN_SIZE \
       --num-attention-heads $NUM_HEADS \
       --micro-batch-size $MICRO_BATCH_SIZE \
       --global-batch-size $GLOBAL_BATCH_SIZE \
       --seq-length $SEQ_LENGTH \
       --max-position-embeddings $SEQ_LENGTH \
       --train-iters $TRAIN_STEPS \
       --save $CHECKPOINT_PATH \
       --load $CHECKPOINT_PATH \
       --data-path $DATASET \
       --data-impl mmap \
       --tokenizer-type GPTSentencePieceTokenizer \
       --tokenizer-model $TOKENIZER_PATH \
       --split 949,50,1 \
       --distributed-backend nccl \
       --lr $LR \
       --lr-decay-style cosine \
       --min-lr $MIN_LR \
       --weight-decay $WEIGHT_DECAY \
       --clip-grad $GRAD_CLIP \
       --lr-warmup-iters $LR_WARMUP_STEPS \
       --optimizer adam \
       --adam-beta1 0.9 \
       --adam-beta2 0.95 \
       --log-interval 1 \
       --save-interval 10000 \
       --eval-interval 1000 \
       --eval-iters 10 \
       --bf16 \
       --no-query-key-layer-scaling \
       --attention-dropout 0 \
       --hidden-dropout 0 \
       --use-rotary-position-embeddings \
       --untie-embeddings-and-output-weights \
       --swiglu \
       --normalization rmsnorm \
       --disable-bias-linear \
       --num-key-value-heads $NUM_KV_HEADS \
       $WANDB_ARGS \
       $ds_args
"""
# ds_args as the script builds it (each piece prepended), and its optional pieces.
DEEPSPEED_DS_ARGS = " --zero-stage=$ZERO_STAGE  --deepspeed_config=$DS_CONFIG  --deepspeed "
DEEPSPEED_BRANCHES = {
    "default": ({}, set()),
    "activation_checkpoint=true": ({"ds_args": "--recompute-granularity full --recompute-method uniform "
                                               "--deepspeed-activation-checkpointing" + DEEPSPEED_DS_ARGS}, set()),
    "LOG_TO_WANDB=1": ({"WANDB_ARGS": "--wandb-project pretrain-llama2 --wandb-exp-name exp0 "
                                      "--wandb-save-dir $BASE_PATH/wandb"},
                       {"--wandb-project", "--wandb-exp-name", "--wandb-save-dir"}),
}


def _deepspeed_variables(tmp_path, sp_model, data_prefix="data/pretrain_text_document"):
    config = tmp_path / "deepspeed.json"
    config.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1,
                                  "zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}))
    return dict(TP=2, PP=2, ZERO_STAGE=0, NUM_LAYERS=4, HIDDEN_SIZE=64, FFN_HIDDEN_SIZE=176, NUM_HEADS=4,
                NUM_KV_HEADS=2, SEQ_LENGTH=32, MICRO_BATCH_SIZE=2, GLOBAL_BATCH_SIZE=8, TRAIN_STEPS=2, LR=3e-4,
                MIN_LR=3e-5, LR_WARMUP_STEPS=1, WEIGHT_DECAY=0.1, GRAD_CLIP=1, CHECKPOINT_PATH=tmp_path / "ckpt",
                DATASET=f"1 {data_prefix}", TOKENIZER_PATH=sp_model, DS_CONFIG=config, BASE_PATH=tmp_path,
                WANDB_ARGS="", ds_args=DEEPSPEED_DS_ARGS)


# ---- Megatron-LM examples/llama/train_llama2.sh (default branches, then the optional ones) -------------------

MEGATRON_LLAMA2 = r"""
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --num-layers $NUM_LAYERS \
    --hidden-size $HIDDEN_SIZE \
    --ffn-hidden-size $FFN_HIDDEN_SIZE \
    --num-attention-heads $NUM_HEADS \
    --seq-length $SEQ_LENGTH \
    --max-position-embeddings $MAX_POSITION_EMBEDDINGS \
    --untie-embeddings-and-output-weights \
    --position-embedding-type rope \
    --no-position-embedding \
    --swiglu \
    --disable-bias-linear \
    --init-method-std 0.02 \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --normalization RMSNorm \
    --micro-batch-size $MBS \
    --global-batch-size $BS \
    --train-iters $TOTAL_ITERS \
    --no-async-tensor-model-parallel-allreduce \
    --bf16 \
    --no-masked-softmax-fusion \
    $GPT_EXTRA
    --tokenizer-type ${TOKENIZER_TYPE} \
    --tokenizer-model ${TOKENIZER_MODEL} \
    --split 99990,8,2 \
    --dataloader-type cyclic \
    --save-interval 200000 \
    --tensorboard-dir $LOG_DIR \
    --log-interval 1 \
    --eval-interval 320000 \
    --eval-iters 10 \
    --num-workers $ds_works \
    --mock-data
    --log-interval $LOG_INTERVAL \
    --log-throughput \
    --no-save-optim \
    --no-save-rng \
    --eval-iters $EVAL_ITERS
        --save-interval $SAVE_INTERVAL \
        --eval-interval $EVAL_INTERVAL \
        --ckpt-format $CKPT_FORMAT \
        --save $SAVE_CKPT_PATH
    --group-query-attention \
    --num-query-groups $NUM_GROUPS \
    --no-gradient-accumulation-fusion \
    --distributed-backend nccl \
    --distributed-timeout-minutes 120 \
    --overlap-grad-reduce \
    $OPTIMIZER_EXTRA $EXTRA
    --use-flash-attn --sequence-parallel --use-mcore-models
    $OPTIMIZER_ARGS
    $LOGGING_ARGS
    $CKPT_LOAD_ARGS
"""
TRAIN_ARGS = "--lr 1e-4 --min-lr 1e-5 --lr-decay-iters 320000 --lr-decay-style cosine --weight-decay 1.0e-1 " \
             "--clip-grad 1.0"
ADAM = {"OPTIMIZER_ARGS": TRAIN_ARGS + " --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95",
        "OPTIMIZER_EXTRA": "--use-distributed-optimizer --overlap-param-gather"}
CKPT_LOAD_ARGS = "--exit-on-missing-checkpoint --no-load-optim --no-load-rng --use-checkpoint-args --load $LOAD_CKPT_PATH"
MEGATRON_BRANCHES = {
    "default": ({}, set()),
    "LOAD_CKPT_PATH": ({"CKPT_LOAD_ARGS": CKPT_LOAD_ARGS}, set()),
    "RECOMPUTE=1": ({"GPT_EXTRA": "--recompute-num-layers $NUM_LAYERS --recompute-granularity full "
                                  "--recompute-method block"}, set()),
    "ROPE_FUSION=0": ({"GPT_EXTRA": "--no-rope-fusion"}, set()),
    "CONTI_PARAMS=1": ({"EXTRA": "--use-contiguous-parameters-in-local-ddp"}, set()),
    "TOKENIZER_TYPE=Llama2Tokenizer": ({"TOKENIZER_TYPE": "Llama2Tokenizer", "TOKENIZER_MODEL": "$SP_MODEL"}, set()),
    "OPTIMIZER=sgd": ({"OPTIMIZER_ARGS": TRAIN_ARGS + " --optimizer sgd", "OPTIMIZER_EXTRA": ""}, {"--optimizer"}),
    "FSDP=1": ({"EXTRA": "--use-torch-fsdp2", "OPTIMIZER_EXTRA": ""}, {"--use-torch-fsdp2"}),
    "ENABLE_PROFILING=1": ({"EXTRA": "--profile --use-pytorch-profiler --tensorboard-dir $LOG_DIR"},
                           {"--profile", "--use-pytorch-profiler"}),
    "TE_FP8=1 delayed": ({"EXTRA": "--transformer-impl=transformer_engine --fp8-recipe=delayed --fp8-format=hybrid "
                                   "--fp8-margin=0 --fp8-interval=1 --fp8-amax-history-len=1024 "
                                   "--fp8-amax-compute-algo=max --attention-softmax-in-fp32"},
                         {"--transformer-impl", "--fp8-recipe", "--fp8-format", "--fp8-margin", "--fp8-interval",
                          "--fp8-amax-history-len", "--fp8-amax-compute-algo"}),
    "TE_FP8=1 mxfp8": ({"EXTRA": "--transformer-impl=transformer_engine --fp8-recipe=mxfp8 --fp8-format=e4m3 "
                                 "--keep_fp8_weight_transpose_cache --fp8-param-gather"},
                       {"--transformer-impl", "--fp8-recipe", "--fp8-format", "--keep_fp8_weight_transpose_cache",
                        "--fp8-param-gather"}),
    "MEGATRON_FSDP=1": ({"EXTRA": "--use-megatron-fsdp --ckpt-format fsdp_dtensor --data-parallel-sharding-strategy "
                                  "optim_grads_params --fsdp-double-buffer"},
                        {"--use-megatron-fsdp", "--ckpt-format", "--data-parallel-sharding-strategy",
                         "--fsdp-double-buffer"}),
    "WANDB_API_KEY": ({"LOGGING_ARGS": "--wandb-project=LLama --wandb-exp-name=LLama_7B --wandb-save-dir logs/wandb"},
                      {"--wandb-project", "--wandb-exp-name", "--wandb-save-dir"}),
}


def _megatron_variables(tmp_path, hf_dir, sp_model, tp=1):
    return dict(TP=tp, PP=1, CP=1, NUM_LAYERS=2, HIDDEN_SIZE=64, FFN_HIDDEN_SIZE=176, NUM_HEADS=4, NUM_GROUPS=2,
                SEQ_LENGTH=32, MAX_POSITION_EMBEDDINGS=32000, MBS=2, BS=8, TOTAL_ITERS=2, TOKENIZER_TYPE=
                "HuggingFaceTokenizer", TOKENIZER_MODEL=hf_dir, SP_MODEL=sp_model, LOG_DIR=tmp_path / "logs",
                ds_works=0, LOG_INTERVAL=1, EVAL_ITERS=1, SAVE_INTERVAL=5000, EVAL_INTERVAL=5000, CKPT_FORMAT="torch",
                SAVE_CKPT_PATH=tmp_path / "ckpt", LOAD_CKPT_PATH=tmp_path / "ckpt", GPT_EXTRA="", EXTRA="",
                LOGGING_ARGS="", CKPT_LOAD_ARGS="", **ADAM)


# ---- NVIDIA/Megatron-LM examples: Llama-3 8B (mock-data branch, bf16) and GPT-3 175B -------------------------

# Its array elements like "--split '99,1,0'" reach Megatron with the single quotes kept (written so here).
MEGATRON_LLAMA3_8B = r"""
    --use-mcore-models --num-layers $NUM_LAYERS --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
    --group-query-attention --num-query-groups 8 --kv-channels 128 --seq-length $SEQ_LENGTH
    --max-position-embeddings $MAX_POSITION_EMBEDDINGS --position-embedding-type rope --rotary-base 1000000
    --rotary-percent 1.0 --attention-dropout 0.0 --hidden-dropout 0.0 --swiglu --normalization RMSNorm
    --init-method-std 0.0134 --attention-backend fused --apply-layernorm-1p --untie-embeddings-and-output-weights
    --disable-bias-linear
    --micro-batch-size $MICRO_BATCH_SIZE --global-batch-size $GLOBAL_BATCH_SIZE --train-samples 1953125000
    --lr-decay-samples 1949218748 --lr-warmup-samples 3906252 --lr 0.00015 --min-lr 0.00001 --decoupled-lr 5.0e-4
    --decoupled-min-lr 4.5e-5 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1 --adam-beta1 0.9
    --adam-beta2 0.95 --bf16 --grad-reduce-in-bf16 --cross-entropy-loss-fusion --calculate-per-token-loss --manual-gc
    --empty-unused-memory-level 1 --exit-duration-in-mins 235
    --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
    --tensor-model-parallel-size $TP_SIZE --context-parallel-size $CP_SIZE --sequence-parallel
    --mock-data --tokenizer-type NullTokenizer --vocab-size 128256 --data-cache-path ${DATA_CACHE_PATH}
    --tiktoken-pattern v2 --split "'99,1,0'" --no-create-attention-mask-in-dataloader --no-mmap-bin-files
    --num-workers 1
    --log-interval 1 --eval-iters 32 --eval-interval 100 --save-interval 1000 --log-throughput --profile
    --profile-step-start 4 --profile-step-end 6 --ckpt-format torch_dist --distributed-timeout-minutes 60
    --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --tensorboard-dir "$TENSORBOARD_LOGS_PATH"
"""
LLAMA3_8B_REFUSED = {"--apply-layernorm-1p", "--decoupled-lr", "--decoupled-min-lr", "--grad-reduce-in-bf16",
                     "--manual-gc", "--empty-unused-memory-level", "--exit-duration-in-mins", "--profile",
                     "--profile-step-start", "--profile-step-end"}

MEGATRON_GPT3_175B = r"""
    --num-layers 96 --hidden-size 12288 --num-attention-heads 96 --seq-length 2048 --max-position-embeddings 2048
    --attention-backend auto
    --micro-batch-size 1 --global-batch-size 1536
    --step-batch-size-schedule "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"
    --train-iters 500000 --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.006
    --clip-grad 1.0 --fp16 --lr 6.0e-5 --lr-decay-style cosine --min-lr 6.0e-6 --lr-warmup-fraction .001
    --lr-decay-iters 430000
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 16
    --data-path $DATA_PATH --vocab-file $VOCAB_FILE --merge-file $MERGE_FILE --split 949,50,1
    --log-interval 100 --save-interval 10000 --eval-interval 1000 --save $CHECKPOINT_PATH --load $CHECKPOINT_PATH
    --eval-iters 10 --tensorboard-dir $TENSORBOARD_LOGS_PATH
"""
GPT3_175B_REFUSED = {"--step-batch-size-schedule", "--vocab-file", "--merge-file"}


def _argv(script: str, variables: dict) -> list[str]:
    """The words bash passes to pretrain_gpt.py: variables substituted (twice, for nested ones), then split."""
    text = script.replace("\\\n", " ")
    for _ in range(2):
        text = Template(text).safe_substitute({k: str(v) for k, v in variables.items()})
    assert "$" not in text, text
    return shlex.split(text)


def _without(argv: list[str], flag: str) -> list[str]:
    """argv with `flag` (as --flag, --flag=value or --flag value...) and its values removed."""
    out, skipping = [], False
    for word in argv:
        if word == flag or word.startswith(flag + "="):
            skipping = word == flag
            continue
        if skipping and not word.startswith("--"):
            continue
        skipping = False
        out.append(word)
    return out


def _refused_flags(argv: list[str]) -> set[str]:
    """Parse; on each refusal check it is one line naming a flag of argv, drop that flag, and parse again."""
    refused = set()
    while True:
        try:
            parse_args(argv)
            return refused
        except UserError as err:
            message = str(err)
            assert "\n" not in message
            flag = re.match(r"(--[\w-]+)", message)
            assert flag, f"the refusal does not start with the flag it refuses: {message}"
            flag = flag.group(1)
            assert any(word == flag or word.startswith(flag + "=") for word in argv), message
            assert flag not in refused
            refused.add(flag)
            argv = _without(argv, flag)


@pytest.mark.parametrize("branch", list(DEEPSPEED_BRANCHES))
def test_megatron_deepspeed_llama2_script(branch, tmp_path, tiny_tokenizer_model, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    changes, expected_refused = DEEPSPEED_BRANCHES[branch]
    argv = _argv(DEEPSPEED_LLAMA2, {**_deepspeed_variables(tmp_path, tiny_tokenizer_model), **changes})
    assert _refused_flags(argv) == expected_refused
    if not expected_refused:
        config = parse_args(argv)
        assert config.model.query_groups == 2 and config.model.vocab_size == 600  # --num-key-value-heads, tokenizer
        assert (config.train.deepspeed, config.train.zero_stage, config.train.precision) == (True, 0, "bf16")


@pytest.mark.parametrize("branch", list(MEGATRON_BRANCHES))
def test_megatron_lm_llama2_script(branch, tmp_path, tiny_hf_tokenizer_dir, tiny_tokenizer_model, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    changes, expected_refused = MEGATRON_BRANCHES[branch]
    argv = _argv(MEGATRON_LLAMA2, {**_megatron_variables(tmp_path, tiny_hf_tokenizer_dir, tiny_tokenizer_model),
                                   **changes})
    assert _refused_flags(argv) == expected_refused


def test_megatron_lm_llama2_settings_land_where_they_should(tmp_path, tiny_hf_tokenizer_dir, tiny_tokenizer_model,
                                                            monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    variables = {**_megatron_variables(tmp_path, tiny_hf_tokenizer_dir, tiny_tokenizer_model, tp=2),
                 "CKPT_LOAD_ARGS": CKPT_LOAD_ARGS, "GPT_EXTRA": MEGATRON_BRANCHES["RECOMPUTE=1"][0]["GPT_EXTRA"]}
    config = parse_args(_argv(MEGATRON_LLAMA2, variables))
    train = config.train
    assert (train.dataloader_type, train.distributed_timeout_minutes, train.distributed_backend) == ("cyclic", 120,
                                                                                                    "nccl")
    assert (train.recompute_granularity, train.recompute_method, train.recompute_num_layers) == ("full", "block", 2)
    assert (train.no_save_optim, train.no_save_rng, train.ckpt_format, train.use_checkpoint_args,
            train.exit_on_missing_checkpoint) == (True, True, "torch", True, True)
    assert (train.eval_iters, train.use_distributed_optimizer, train.overlap_grad_reduce) == (1, True, True)
    assert config.model.vocab_size == 802 and config.parallel.sequence_parallel  # tp=2 keeps it


def test_sequence_parallel_is_turned_off_at_tp1_with_a_log_line(caplog):
    with caplog.at_level("WARNING", logger="megagrow"):
        config = parse_args(["--model-preset", "tiny", "--mock-data", "--train-iters", "1", "--sequence-parallel"])
    assert not config.parallel.sequence_parallel
    assert [r.getMessage() for r in caplog.records if "--sequence-parallel" in r.getMessage()]


def test_megatron_lm_llama3_8b_example(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    variables = dict(NUM_LAYERS=2, SEQ_LENGTH=64, MAX_POSITION_EMBEDDINGS=64, MICRO_BATCH_SIZE=1, GLOBAL_BATCH_SIZE=4,
                     TP_SIZE=1, CP_SIZE=1, DATA_CACHE_PATH=tmp_path / "cache", CHECKPOINT_PATH=tmp_path / "ckpt",
                     TENSORBOARD_LOGS_PATH=tmp_path / "tb")
    argv = _argv(MEGATRON_LLAMA3_8B, variables)
    assert _refused_flags(argv) == LLAMA3_8B_REFUSED
    for flag in LLAMA3_8B_REFUSED:
        argv = _without(argv, flag)
    config = parse_args(argv)
    assert config.model.vocab_size == 128257  # NullTokenizer: 128256 ids and the eod after them
    # Sample-based run and schedule, as the iterations they are with a fixed batch of 4.
    assert (config.train.train_iters, config.train.lr_warmup_iters, config.train.lr_decay_iters) == (
        1953125000 // 4, 3906252 // 4, 1949218748 // 4)


def test_megatron_lm_gpt3_175b_example(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "128")
    variables = dict(DATA_PATH=tmp_path / "gpt_text_document", VOCAB_FILE=tmp_path / "vocab.json",
                     MERGE_FILE=tmp_path / "merges.txt", CHECKPOINT_PATH=tmp_path / "ckpt",
                     TENSORBOARD_LOGS_PATH=tmp_path / "tb")
    # Its GPT-2 BPE files are refused (--vocab-file); real data then needs the vocabulary stated.
    argv = _argv(MEGATRON_GPT3_175B, variables) + ["--vocab-size", "50257"]
    assert _refused_flags(argv) == GPT3_175B_REFUSED
    for flag in GPT3_175B_REFUSED:
        argv = _without(argv, flag)
    train = parse_args(argv).train  # --lr-warmup-fraction .001 of 430000 decay iterations, in samples as Megatron-LM
    assert lr_schedule_config(train, train.train_iters).warmup_samples == pytest.approx(430 * train.global_batch_size)


@pytest.mark.parametrize("extra, message", [
    (["--context-parallel-size", "2"], "--context-parallel-size 2: accepted 1 only: megagrow has no context"),
    (["--normalization", "LayerNorm"], "--normalization LayerNorm: megagrow builds Llama models, which use RMSNorm"),
    (["--num-key-value-heads", "2", "--num-query-groups", "4"], "--num-key-value-heads 2 and --num-query-groups 4"),
    (["--dataloader-type", "external"], "--dataloader-type external: megagrow builds its own data loader"),
    (["--ckpt-format", "torch_dcp"], "--ckpt-format torch_dcp: megagrow writes torch or torch_dist"),
    (["--data-impl", "lazy"], "--data-impl lazy: accepted mmap"),
    (["--kv-channels", "32"], "--kv-channels 32: megagrow's head dimension is"),
    (["--lr-warmup-fraction", "0.3", "--lr-warmup-iters", "5"], "--lr-warmup-fraction with --lr-warmup-iters"),
    (["--train-samples", "10"], "--train-samples 10 is not a whole number of --global-batch-size 8 batches"),
    (["--no-pipeline-parallel", "--pipeline-model-parallel-size", "2"], "--no-pipeline-parallel with"),
])
def test_values_megagrow_cannot_honour_are_refused_in_one_line(extra, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["--model-preset", "tiny", "--mock-data", *extra]
    if "--train-iters" not in extra and "--train-samples" not in extra:
        argv += ["--train-iters", "1"]
    with pytest.raises(UserError, match=re.escape(message)) as info:
        parse_args(argv)
    assert "\n" not in str(info.value)


def test_an_unknown_flag_is_one_line(capsys):
    # A UserError (not argparse's exit): under torchrun it is then reported once per job, not once per rank.
    with pytest.raises(UserError, match="unrecognized arguments: --not-a-megatron-flag 3") as info:
        parse_args(["--model-preset", "tiny", "--not-a-megatron-flag", "3"])
    assert "\n" not in str(info.value)
    import pretrain_gpt

    with pytest.raises(SystemExit) as info:
        pretrain_gpt.main(["--model-preset", "tiny", "--not-a-megatron-flag", "3"])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_help_lists_every_compatibility_flag():
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--help"], capture_output=True,
                               text=True, check=True).stdout
    for flag in ("--use-mcore-models", "--overlap-param-gather", "--context-parallel-size", "--wandb-project",
                 "--dataloader-type", "--recompute-method", "--distributed-timeout-minutes", "--ckpt-format"):
        assert flag in help_text


def test_exit_on_missing_checkpoint_stops_with_one_line(tmp_path, capsys):
    import pretrain_gpt

    empty = tmp_path / "nothing_here"
    empty.mkdir()
    with pytest.raises(SystemExit) as info:
        pretrain_gpt.main(["--model-preset", "tiny", "--mock-data", "--train-iters", "1", "--load", str(empty),
                           "--exit-on-missing-checkpoint"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--load {empty} holds no checkpoint" in err


def _report_group_timeouts(rank, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    sys.path.insert(0, ROOT)
    import torch

    import pretrain_gpt
    from megagrow.parallel import state

    class ReportingTrainer:  # stands in for training: reads the groups pretrain_gpt.main set up
        def __init__(self, *_):
            pass

        def run(self):
            import torch.distributed as dist

            groups = {"world": dist.group.WORLD, "dp": state.dp_group(), "tp": state.tp_group(),
                      "pp": state.pp_group()}
            timeouts = {name: group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                        for name, group in groups.items()}
            with open(f"{result_path}.{rank}", "w") as f:
                json.dump(timeouts, f)

    pretrain_gpt.Trainer = ReportingTrainer
    pretrain_gpt.main(["--model-preset", "tiny", "--mock-data", "--train-iters", "1", "--distributed-timeout-minutes",
                       "3", "--distributed-backend", "gloo"])


def test_distributed_timeout_reaches_every_process_group(tmp_path):
    port, result = free_port(), tmp_path / "timeouts"
    context = mp.get_context("spawn")
    workers = [context.Process(target=_report_group_timeouts, args=(rank, port, str(result))) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    for rank in range(2):
        timeouts = json.loads((tmp_path / f"timeouts.{rank}").read_text())
        assert timeouts == {name: datetime.timedelta(minutes=3).total_seconds() for name in timeouts}


def test_megatron_lm_llama2_script_trains_under_torchrun(tmp_path, tiny_hf_tokenizer_dir, tiny_tokenizer_model):
    variables = _megatron_variables(tmp_path, tiny_hf_tokenizer_dir, tiny_tokenizer_model)
    argv = _argv(MEGATRON_LLAMA2, variables)
    argv[argv.index("--distributed-backend") + 1] = "gloo"  # the script's nccl needs GPUs
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             os.path.join(ROOT, "pretrain_gpt.py"), *argv], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "--sequence-parallel with --tensor-model-parallel-size 1" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["tokens_per_second"] > 0 for r in train)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
