"""megatron-core 0.16.1 as a peer in tests: its GPTModel (local layer spec) and dist_checkpointing on the CPU.

megatron-core is a test-only dependency (`pip install --no-deps megatron-core==0.16.1 psutil`);
tests `pytest.importorskip` it. It runs on the CPU with a gloo process group once three calls
that assume CUDA are shimmed, all here:

- `torch.cuda.current_device()` (RoPE frequencies, dist_checkpointing's save finalisation)
  answers "cpu";
- `torch.cuda.synchronize()` (dist_checkpointing's save) does nothing;
- the default causal mask is built on CUDA, so `logits` passes an explicit boolean mask.

Its optimizer needs two more, applied only inside `optimizer_cuda_shims()`.

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
                          ckpt_format: str, optimizer=None, optimizer_sharding: str | None = None) -> None:
    """Save this rank's model as Megatron-LM's save_checkpoint lays it out (torch or torch_dist), with its tracker,
    and with torch_dist the Adam state of megatron-core's `optimizer` when given."""
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
        # Megatron-LM's own optimizer record (its layout, not megagrow's): the optimizer's, or an empty one.
        record = optimizer.state_dict() if optimizer is not None else {
            "optimizer": {"state": {}, "param_groups": [{"params": [], "wd_mult": 1.0, "lr_mult": 1.0}]},
            "fp32_from_fp16_params": []}
        torch.save({**common, "model": model.state_dict(), "optimizer": record},
                   os.path.join(directory, name, "model_optim_rng.pt"))
    else:
        os.makedirs(directory, exist_ok=True)
        dist.barrier()
        state = ({**common, "model": model.sharded_state_dict()} if optimizer is None
                 else optimizer_checkpoint_state(model, optimizer, common, sharding=optimizer_sharding))
        dist_checkpointing.save(state, directory)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))


class _CpuTorch:
    """megatron-core's optimizer modules' view of `torch`: tensors it creates on "cuda" are made on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _on_cpu(kwargs: dict) -> dict:
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._on_cpu(kwargs))

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._on_cpu(kwargs))

    def empty(self, *args, **kwargs):
        return torch.empty(*args, **self._on_cpu(kwargs))


@contextlib.contextmanager
def optimizer_cuda_shims():
    """Let megatron-core's optimizer run on the CPU for the block: the two CUDA assumptions past the model's.

    Its optimizer, gradient clipping and multi-tensor helpers create tensors with device="cuda", and
    check `param.type() == "torch.cuda.FloatTensor"` (clipping, the mixed-precision optimizer): the
    first go to the CPU, and a CPU tensor's `type()` answers with its CUDA name.
    """
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.utils as utils

    modules = (optimizer, clip_grads, utils)
    saved_torch = [module.torch for module in modules]
    original_type = torch.Tensor.type

    def cuda_type_name(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if not args and not kwargs and not self.is_cuda and name.startswith("torch.") and ".cuda." not in name:
            return "torch.cuda." + name[len("torch."):]
        return name

    for module in modules:
        module.torch = _CpuTorch()
    torch.Tensor.type = cuda_type_name
    try:
        yield
    finally:
        torch.Tensor.type = original_type
        for module, saved in zip(modules, saved_torch):
            module.torch = saved


def megatron_optimizer(model, *, lr: float = 1e-2, weight_decay: float = 0.1, bf16: bool = False,
                       distributed: bool = False):
    """(DDP-wrapped model, megatron-core's Adam over it) as Megatron-LM builds them (call inside
    optimizer_cuda_shims)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    module = model
    if bf16:  # as Megatron-LM's --bf16: bf16 parameters behind Float16Module, fp32 masters in the optimizer
        import copy

        from megatron.core.transformer.module import Float16Module

        config = copy.copy(model.config)
        config.bf16, config.params_dtype, config.pipeline_dtype = True, torch.bfloat16, torch.bfloat16
        module = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed)
    ddp = DistributedDataParallel(module.config, ddp_config, module)
    config = OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=weight_decay, adam_beta1=0.9,
                             adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0, bf16=bf16, fp16=False,
                             params_dtype=torch.bfloat16 if bf16 else torch.float32,
                             use_distributed_optimizer=distributed)
    return ddp, get_megatron_optimizer(config, [ddp])


def train_step(ddp, optimizer, tokens: torch.Tensor) -> None:
    """One megatron-core update on next-token prediction of `tokens` [b, s + 1]."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    b, s = inputs.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    ddp.train()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(inputs, positions, causal, labels=labels).float().mean().backward()
    ddp.finish_grad_sync()
    optimizer.step()


def adam_state(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """This rank's Adam state of megatron-core's optimizer by model parameter name: exp_avg, exp_avg_sq, step, and
    the fp32 master (`fp32_param` with bf16; the distributed one's `param`, whole with one data-parallel rank)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = optimizer.chained_optimizers[0]
    if isinstance(chained, DistributedOptimizer):
        def whole(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:  # flat shards, whole at dp=1
            return value.detach().clone().view(param.shape) if value.numel() == param.numel() else value.clone()

        return {name: {key: whole(value, param) for key, value in
                       chained._get_main_param_and_optimizer_states(param).items()}
                for name, param in model.named_parameters()}
    inner = chained.optimizer
    masters = {}  # the mixed-precision optimizer steps fp32 copies of the bf16 parameters
    for model_group, master_group in zip(getattr(chained, "float16_groups", []),
                                         getattr(chained, "fp32_from_float16_groups", [])):
        masters.update({id(param): master for param, master in zip(model_group, master_group)})
    state = {}
    for name, param in model.named_parameters():
        stepped = masters.get(id(param), param)
        record = inner.state.get(stepped, {})
        if record:
            state[name] = {key: value.detach().clone() for key, value in record.items()}
            if stepped is not param:
                state[name]["fp32_param"] = stepped.detach().clone()
    return state


def optimizer_checkpoint_state(model, optimizer, common: dict, is_loading: bool = False,
                               sharding: str | None = None) -> dict:
    """What Megatron-LM's save/load_checkpoint hand to dist_checkpointing for ckpt_format torch_dist; `sharding` is
    its distributed optimizer's layout: dp_reshardable (its default) or fully_reshardable (gathered over gloo,
    as --dist-ckpt-optim-fully-reshardable with the memory-efficient option)."""
    from megatron.core import parallel_state

    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    if sharding is not None:
        metadata["distrib_optim_sharding_type"] = sharding
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
    state = {**common, "model": model.sharded_state_dict(metadata=metadata)}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state
