"""Convert a checkpoint saved by `pretrain_gpt.py --deepspeed` (any ZeRO stage) to Megatron-LM's sharded layout.

    python tools/convert_deepspeed_checkpoint.py --load ds_ckpt --save ckpt \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1 [--ckpt-format torch_dist]

The result holds model weights and config (no optimizer state), which pretrain_gpt.py
--load, tools/stack_checkpoint.py, tools/convert_checkpoint.py (HF export) and Megatron-LM accept.
"""

import argparse

from megagrow.checkpoint.deepspeed_reader import read_deepspeed_checkpoint
from megagrow.checkpoint.layout import CKPT_FORMATS, TORCH
from megagrow.checkpoint.reshard import reader_from_state_dict, save_sharded
from megagrow.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    """Read the DeepSpeed checkpoint whole, then write it in the target (tp, pp) layout."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="the --save directory of the DeepSpeed run")
    parser.add_argument("--tag", help="checkpoint tag, e.g. iter_0001000 (default: DeepSpeed's 'latest')")
    parser.add_argument("--save", required=True, help="output directory (megagrow layout)")
    parser.add_argument("--target-tensor-parallel-size", type=int, help="default: the run's tp")
    parser.add_argument("--target-pipeline-parallel-size", type=int, help="default: the run's pp")
    parser.add_argument("--ckpt-format", choices=CKPT_FORMATS, default=TORCH,
                        help="format to write: torch (per-rank files) or torch_dist (default torch)")
    args = parser.parse_args(argv)
    config, state_dict, iteration = read_deepspeed_checkpoint(args.load, args.tag)
    print(f"read {len(state_dict)} tensors of a {config.num_layers}-layer model at iteration {iteration}")
    tp = args.target_tensor_parallel_size or 1
    pp = args.target_pipeline_parallel_size or 1
    path = save_sharded(args.save, iteration, config, reader_from_state_dict(state_dict, config), tp=tp, pp=pp,
                        ckpt_format=args.ckpt_format)
    print(f"wrote {path} (tp={tp} pp={pp}, {args.ckpt_format})")
    return path


if __name__ == "__main__":
    main()
