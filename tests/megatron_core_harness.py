"""megatron-core 0.16.1 as a peer in tests: its GPTModel (local layer spec) and dist_checkpointing on the CPU.

megatron-core is a test-only dependency (`pip install --no-deps megatron-core==0.16.1 psutil`);
tests `pytest.importorskip` it. It runs on the CPU with a gloo process group once three calls
that assume CUDA are shimmed, all here:

- `torch.cuda.current_device()` (RoPE frequencies, dist_checkpointing's save finalisation)
  answers "cpu";
- `torch.cuda.synchronize()` (dist_checkpointing's save) does nothing;
- the default causal mask is built on CUDA, so `logits` passes an explicit boolean mask.

dist_checkpointing's torch_dist writer starts a spawn-based process, so a test that saves
runs the saving code in a worker (or under an `if __name__ == "__main__"` guard).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from megagrow.config import ModelConfig


def apply_cuda_shims() -> None:
    """Point megatron-core's CUDA-only calls at the CPU (idempotent)."""
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None


def initialize(tp: int = 1, pp: int = 1) -> None:
    """megatron-core's parallel state over the already initialised default (gloo) process group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random

    apply_cuda_shims()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


@contextlib.contextmanager
def single_process_group(port: int):
    """A gloo group of one for the duration of the block (megatron-core needs one even at tp=1)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        initialize(1, 1)
        yield
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def transformer_config(config: ModelConfig, tp: int = 1, pp: int = 1):
    """megatron-core's TransformerConfig for a megagrow Llama config (fp32, no fusions, no dropout)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=config.num_layers, hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        num_query_groups=config.query_groups, ffn_hidden_size=config.ffn_hidden_size,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, layernorm_epsilon=config.norm_eps,
        use_cpu_initialization=True, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        normalization="RMSNorm", bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False, hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=config.init_method_std, pipeline_dtype=torch.float32)


def gpt_model(config: ModelConfig, tp: int = 1, pp: int = 1):
    """megatron-core's GPTModel with the local layer spec, shaped as `config` (this rank's tp shard)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megagrow.config import padded_vocab_size

    vocab = padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by, tp)
    return GPTModel(transformer_config(config, tp, pp), get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=vocab, max_sequence_length=config.max_positions, position_embedding_type="rope",
                    rotary_base=int(config.rope_theta), share_embeddings_and_output_weights=config.tie_embeddings)


def logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """megatron-core's logits [b, s, vocab] for tokens [b, s] (gathered over tp, padding rows dropped)."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)  # True = masked
    model.eval()
    with torch.no_grad():
        out = model(tokens, positions, causal)  # [b, s, padded_vocab / tp]
    return gather_from_tensor_model_parallel_region(out)[..., :vocab_size]


def stage_model(config: ModelConfig, tp: int, pp: int, pp_rank: int):
    """This rank's pipeline stage of megatron-core's GPTModel (its layers numbered from 0, as Megatron saves them)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from megagrow.config import padded_vocab_size

    vocab = padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by, tp)
    return GPTModel(transformer_config(config, tp, pp), get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=vocab, max_sequence_length=config.max_positions, position_embedding_type="rope",
                    rotary_base=int(config.rope_theta), share_embeddings_and_output_weights=config.tie_embeddings,
                    pre_process=pp_rank == 0, post_process=pp_rank == pp - 1)


def megatron_lm_args(config: ModelConfig, tp: int, pp: int, *, iteration: int, consumed_train_samples: int,
                     global_batch_size: int, ckpt_format: str):
    """The `args` Namespace Megatron-LM's pretrain_gpt.py would save for this Llama run (its attribute names)."""
    import argparse

    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    from megagrow.config import padded_vocab_size

    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, group_query_attention=True,
        num_query_groups=config.query_groups, kv_channels=config.head_dim, seq_length=config.seq_length,
        max_position_embeddings=config.max_positions, position_embedding_type="rope", rotary_base=int(config.rope_theta),
        rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False, swiglu=True, normalization="RMSNorm",
        norm_epsilon=config.norm_eps, add_bias_linear=False, add_qkv_bias=False,
        untie_embeddings_and_output_weights=not config.tie_embeddings, apply_layernorm_1p=False,
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by, vocab_size=None,
        padded_vocab_size=padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by, tp),
        tokenizer_type="GPTSentencePieceTokenizer", tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, num_experts=None, params_dtype=torch.float32, bf16=False,
        fp16=False, consumed_train_samples=consumed_train_samples, consumed_valid_samples=0,
        global_batch_size=global_batch_size, micro_batch_size=1, iteration=iteration, ckpt_format=ckpt_format,
        model_type=ModelType.encoder_or_decoder, attention_backend=AttnBackend.auto, transformer_impl="local",
        init_method_std=config.init_method_std)


def save_like_megatron_lm(model, root: str, *, args, iteration: int, tp_rank: int, pp_rank: int, pp: int,
                          ckpt_format: str) -> None:
    """Save this rank's model as Megatron-LM's save_checkpoint lays it out (torch or torch_dist), with its tracker."""
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    directory = os.path.join(root, f"iter_{iteration:07d}")
    scheduler = {"max_lr": 3e-4, "lr_warmup_steps": 0, "num_steps": iteration * args.global_batch_size,
                 "lr_decay_style": "cosine", "lr_decay_steps": 100 * args.global_batch_size, "min_lr": 0.0,
                 "start_wd": 0.1, "end_wd": 0.1, "wd_incr_style": "constant", "wd_incr_steps": 0}
    common = {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "opt_param_scheduler": scheduler,
              "num_floating_point_operations_so_far": 0.0}
    if ckpt_format == "torch":
        name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
        os.makedirs(os.path.join(directory, name), exist_ok=True)
        # Megatron-LM's own optimizer record (its layout, not megagrow's).
        optimizer = {"optimizer": {"state": {}, "param_groups": [{"params": [], "wd_mult": 1.0, "lr_mult": 1.0}]},
                     "fp32_from_fp16_params": []}
        torch.save({**common, "model": model.state_dict(), "optimizer": optimizer},
                   os.path.join(directory, name, "model_optim_rng.pt"))
    else:
        os.makedirs(directory, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save({**common, "model": model.sharded_state_dict()}, directory)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
