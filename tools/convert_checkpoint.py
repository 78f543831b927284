"""Convert checkpoints: megagrow or Megatron-LM (any tp/pp, torch or torch_dist) <-> HF LlamaForCausalLM,
another tp/pp layout, or the other format; and upgrade checkpoints of older megagrow versions.

    python tools/convert_checkpoint.py to-hf --load ckpt [--iteration N] --save hf_model
    python tools/convert_checkpoint.py from-hf --load hf_model --save ckpt \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2
    python tools/convert_checkpoint.py reshard --load ckpt --save ckpt_tp1 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1 [--ckpt-format torch_dist]
    python tools/convert_checkpoint.py upgrade --load old_megagrow_ckpt --save ckpt

--load takes megagrow's checkpoints and Megatron-LM's alike (a Llama GPT model: RMSNorm,
SwiGLU, RoPE, no biases), in the torch or torch_dist format; what is written is Megatron-LM's
format (megatron-core's names, `args`), which both pretrain_gpt.py and Megatron-LM load.
Written checkpoints hold the model only: training starts a new run from them (fresh
optimizer, iteration 0); pass the same model flags, and for an HF import the --seq-length and
--make-vocab-size-divisible-by given here. `reshard` keeps the source's iteration number.
`upgrade` rewrites a checkpoint of megagrow before it adopted megatron-core's names into the
current format, run state included (optimizer, progress, LR schedule, RNG), in the same layout.
HF output is config.json plus safetensors (split into files of --max-shard-size GB).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megagrow.checkpoint.hf_llama import DEFAULT_MAX_SHARD_BYTES, HFCheckpointReader, save_hf
from megagrow.checkpoint.layout import CKPT_FORMATS, TORCH, parse_iteration, read_tracker
from megagrow.checkpoint.megagrow_v1 import upgrade_checkpoint
from megagrow.checkpoint.reader import CheckpointReader
from megagrow.checkpoint.reshard import save_sharded
from megagrow.errors import UserError, exit_on_user_error, positive_int

HF_IMPORT_ITERATION = 0


def _refuse_existing_checkpoint(save: str, load: str) -> None:
    if Path(save).resolve() == Path(load).resolve():
        raise UserError(f"--save {save} is the --load directory; write the converted checkpoint to a new directory")
    if read_tracker(save) is not None:
        raise UserError(f"--save {save} already holds a checkpoint; choose a new directory")


def run_to_hf(args: argparse.Namespace) -> Path:
    """megagrow checkpoint -> HF directory."""
    reader = CheckpointReader(args.load, parse_iteration(args.iteration), vocab_size=args.vocab_size)
    print(f"reading {args.load} iteration {reader.iteration} ({reader.origin}, {reader.format}, tp={reader.tp} "
          f"pp={reader.pp})")
    path = save_hf(args.save, reader.config, reader.read_group, max_shard_bytes=int(args.max_shard_size * 1024**3))
    print(f"wrote HF LlamaForCausalLM to {path}")
    return path


def run_from_hf(args: argparse.Namespace) -> Path:
    """HF directory -> megagrow checkpoint of the target layout."""
    _refuse_existing_checkpoint(args.save, args.load)
    reader = HFCheckpointReader(args.load, seq_length=args.seq_length,
                                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    path = save_sharded(args.save, HF_IMPORT_ITERATION, reader.config, reader.read_group,
                        tp=args.target_tensor_parallel_size, pp=args.target_pipeline_parallel_size,
                        layers_per_stage=args.pipeline_layer_split, ckpt_format=args.ckpt_format)
    print(f"wrote {path} (tp={args.target_tensor_parallel_size} pp={args.target_pipeline_parallel_size}); "
          f"train from it with --load {args.save} --seq-length {reader.config.seq_length} "
          f"--make-vocab-size-divisible-by {reader.config.make_vocab_size_divisible_by}")
    return path


def run_reshard(args: argparse.Namespace) -> Path:
    """megagrow checkpoint -> megagrow checkpoint of another layout."""
    _refuse_existing_checkpoint(args.save, args.load)
    reader = CheckpointReader(args.load, parse_iteration(args.iteration), vocab_size=args.vocab_size)
    print(f"reading {args.load} iteration {reader.iteration} ({reader.origin}, {reader.format}, tp={reader.tp} "
          f"pp={reader.pp})")
    path = save_sharded(args.save, reader.iteration, reader.config, reader.read_group,
                        tp=args.target_tensor_parallel_size, pp=args.target_pipeline_parallel_size,
                        layers_per_stage=args.pipeline_layer_split, describe_group=reader.describe_group,
                        ckpt_format=args.ckpt_format)
    print(f"wrote {path} (tp={args.target_tensor_parallel_size} pp={args.target_pipeline_parallel_size}, "
          f"{args.ckpt_format})")
    return path


def run_upgrade(args: argparse.Namespace) -> Path:
    """Older megagrow checkpoint -> the current format, run state included, same layout."""
    _refuse_existing_checkpoint(args.save, args.load)
    path = upgrade_checkpoint(args.load, args.save, parse_iteration(args.iteration))
    print(f"wrote {path}: megatron-core names, Megatron-LM's args; resume with --load {args.save}")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags of the four subcommands."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="megagrow checkpoint -> HF LlamaForCausalLM directory")
    from_hf = commands.add_parser("from-hf", help="HF LlamaForCausalLM directory -> megagrow checkpoint")
    reshard = commands.add_parser("reshard", help="checkpoint -> another tensor/pipeline layout or format")
    upgrade = commands.add_parser("upgrade", help="checkpoint of an older megagrow -> the current format")
    for command in (to_hf, from_hf, reshard, upgrade):
        command.add_argument("--load", required=True, metavar="DIR", help="directory to convert")
        command.add_argument("--save", required=True, metavar="DIR", help="new directory to write")
    for command in (to_hf, reshard, upgrade):
        command.add_argument("--iteration", help="iteration to convert, or 'release' (default: the latest)")
    for command in (to_hf, reshard):
        command.add_argument("--vocab-size", type=positive_int, metavar="V",
                             help="the tokenizer's vocabulary, for Megatron-LM checkpoints whose args record only "
                                  "the padded size (default: the recorded size)")
    for command in (from_hf, reshard):
        command.add_argument("--ckpt-format", choices=CKPT_FORMATS, default=TORCH,
                             help="format to write: torch (per-rank files) or torch_dist (default torch)")
        command.add_argument("--target-tensor-parallel-size", type=positive_int, default=1, metavar="T",
                             help="tensor-parallel size of the written checkpoint (default 1)")
        command.add_argument("--target-pipeline-parallel-size", type=positive_int, default=1, metavar="P",
                             help="pipeline-parallel size of the written checkpoint (default 1)")
        command.add_argument("--pipeline-layer-split", type=positive_int, nargs="+", metavar="N",
                             help="layers per target stage, e.g. 5 6 6 5 (default: even)")
    from_hf.add_argument("--seq-length", type=positive_int,
                         help="training sequence length (default: the model's max_position_embeddings)")
    from_hf.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128, metavar="N",
                         help="vocabulary padding multiple (per tp rank), as pretrain_gpt.py's flag (default 128)")
    to_hf.add_argument("--max-shard-size", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3, metavar="GB",
                       help="largest safetensors file (default 5)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    """Run one subcommand; returns the directory written."""
    args = parse_args(argv)
    return {"to-hf": run_to_hf, "from-hf": run_from_hf, "reshard": run_reshard, "upgrade": run_upgrade}[args.command](args)


if __name__ == "__main__":
    main()
