"""Grow a trained checkpoint in depth (G_stack by default) into a checkpoint of any tp/pp layout.

    python tools/stack_checkpoint.py --load base_ckpt --save grown_ckpt --growth-factor 4 \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 4 [--ckpt-format torch_dist]

--load takes megagrow's checkpoints and Megatron-LM's (torch or torch_dist, any layout); the
grown checkpoint is written in Megatron-LM's format, so Megatron-LM trains it too.

The grown model has factor x the base's layers: with depth:stack, layers 0..L-1 repeated
factor times; embedding, final norm and head are copied. Every shard records the growth
(operator, factor, source and its iteration) under "growth". By default the result holds
the model only and `pretrain_gpt.py --load grown_ckpt --num-layers <L x factor>` starts a
new run from it. With --carry-run-state (implied by --stack-optimizer-state) it also holds
the base run's progress, LR schedule position and RNG, and training resumes where the base
stopped; --stack-optimizer-state stacks the Adam moments like the weights.

Memory stays near a few copies of one layer (or of the embedding, if larger), whatever the
model size: base layers are read memory-mapped one at a time and each target shard file is
streamed, written layer by layer (benchmarks/RESULTS.md, "Stacking memory").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megagrow.checkpoint.layout import CKPT_FORMATS, TORCH, parse_iteration
from megagrow.checkpoint.reader import CheckpointReader
from megagrow.errors import exit_on_user_error, positive_int
from megagrow.growth.depth import LAYOUTS
from megagrow.growth.operators import DEPTH, OPERATORS, GrowthSpec
from megagrow.growth.run_state import RunStateOptions
from megagrow.growth.stacking import stack_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--load", required=True, metavar="DIR", help="base checkpoint (any tp/pp layout)")
    parser.add_argument("--save", required=True, metavar="DIR", help="new directory for the grown checkpoint")
    parser.add_argument("--iteration", help="base iteration to grow, or 'release' (default: the latest)")
    parser.add_argument("--growth-factor", type=int, default=4, metavar="G", help="layers x G (default 4)")
    depth_operators = [name for name, op in OPERATORS.items() if op.dimension == DEPTH]
    parser.add_argument("--operator", choices=depth_operators, default="depth:stack",
                        help="depth growth operator (default depth:stack, the paper's G_stack)")
    parser.add_argument("--layout", choices=LAYOUTS, help="where depth:zero / depth:random put the new layers")
    parser.add_argument("--seed", type=int, default=1234, help="seed of new layers (depth:zero, depth:random)")
    parser.add_argument("--target-tensor-parallel-size", type=positive_int, metavar="T",
                        help="default: the base checkpoint's")
    parser.add_argument("--target-pipeline-parallel-size", type=positive_int, metavar="P",
                        help="default: the base checkpoint's")
    parser.add_argument("--pipeline-layer-split", type=positive_int, nargs="+", metavar="N",
                        help="grown layers per target stage, e.g. 5 6 6 5 (default: even)")
    parser.add_argument("--carry-run-state", action="store_true",
                        help="keep the base run's progress, LR schedule and RNG, with a fresh optimizer")
    parser.add_argument("--stack-optimizer-state", action="store_true",
                        help="carry the run state and stack the Adam moments like the weights")
    parser.add_argument("--vocab-size", type=positive_int, metavar="V",
                        help="the tokenizer's vocabulary, for Megatron-LM checkpoints whose args record only the "
                             "padded size (default: the recorded size)")
    parser.add_argument("--ckpt-format", choices=CKPT_FORMATS, default=TORCH,
                        help="format to write: torch (per-rank files) or torch_dist (default torch)")
    parser.add_argument("--no-progress-bar", action="store_true")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    """Grow the checkpoint; returns the iteration directory written."""
    args = parse_args(argv)
    spec = GrowthSpec(operator=args.operator, factor=args.growth_factor, layout=args.layout, seed=args.seed)
    run_state = None
    if args.carry_run_state or args.stack_optimizer_state:
        run_state = RunStateOptions(stack_optimizer_state=args.stack_optimizer_state)
    path = stack_checkpoint(args.load, args.save, spec, iteration=parse_iteration(args.iteration),
                            tp=args.target_tensor_parallel_size, pp=args.target_pipeline_parallel_size,
                            layers_per_stage=args.pipeline_layer_split, run_state=run_state,
                            progress=not args.no_progress_bar, ckpt_format=args.ckpt_format,
                            vocab_size=args.vocab_size)
    layers = CheckpointReader(args.save).config.num_layers
    print(f"wrote {path}: {layers} layers; train it with pretrain_gpt.py --load {args.save} --num-layers {layers} "
          f"and the base run's other model flags")
    return path


if __name__ == "__main__":
    main()
