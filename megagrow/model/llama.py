"""Llama decoder: embedding, pre-norm blocks of attention and SwiGLU, final norm, output head.

Activations are [s, b, h] (sequence first, as in Megatron): the sequence-parallel split is then
a split of the leading dimension, and the tp collectives act on contiguous memory. With
sequence parallelism on, everything outside the tensor-parallel regions (residual stream,
norms) holds [s/t, b, h]: column-parallel inputs all-gather along the sequence and
row-parallel outputs reduce-scatter back.

Module names are megatron-core's GPTModel's (`embedding.word_embeddings`,
`decoder.layers.N.self_attention.linear_qkv`, `decoder.final_layernorm`, `output_layer`, see
megagrow/checkpoint/names.py), so a stage's state dict is what Megatron-LM saves and loads.
A pipeline stage builds only its part: the embedding when `pre_process`, the final norm and
output head when `post_process`, and the layers [start, end) of the global numbering, which
its `decoder.layers` holds numbered from 0 as megatron-core does (`layer_offset` = start).

Initialisation: every weight is drawn from its own generator, seeded from `seed` and the
weight's name in the full model (global layer number; megagrow.parallel.layers.derive_seed),
so a tp=4 or pp=2 model equals the tp=1 model with the same seed. Output projections (attention dense, MLP down) use
std / sqrt(2 * num_layers), keeping the residual stream's variance independent of depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megagrow.checkpoint import names
from megagrow.config import ModelConfig, ParallelConfig, padded_vocab_size, validate_parallel
from megagrow.errors import UserError
from megagrow.model import recompute
from megagrow.model.attention import SelfAttention
from megagrow.model.backends import log_choice
from megagrow.model.chunked_loss import chunked_head_loss, validate_chunk_size
from megagrow.model.mlp import SwiGLUMLP
from megagrow.model.norm import RMSNorm
from megagrow.model.rope import RotaryEmbedding
from megagrow.parallel import state
from megagrow.parallel.cross_entropy import vocab_parallel_cross_entropy
from megagrow.parallel.layers import ColumnParallelLinear, InitMethod, VocabParallelEmbedding, derive_seed, normal_init
from megagrow.parallel.mappings import gather_from_tp_region
from megagrow.parallel.pipeline import partition_layers

EMBEDDING_INIT_KEY = names.EMBEDDING


def _padded_rows_init(init_method: InitMethod, real_rows: int) -> InitMethod:
    # Vocabulary padding depends on tp; drawing only the real rows (padding stays zero) keeps
    # the real rows identical at every tp.
    def init(weight: torch.Tensor) -> None:
        init_method(weight[:real_rows])
        with torch.no_grad():
            weight[real_rows:].zero_()

    return init


class LlamaDecoderLayer(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_number: int, *, sequence_parallel: bool, seed: int,
                 device: torch.device | str | None = None, force_torch_kernels: bool | None = None):
        super().__init__()
        std = config.init_method_std
        output_std = std / math.sqrt(2.0 * config.num_layers)

        def init(suffix: str, scale: float) -> InitMethod:
            return normal_init(scale, derive_seed(seed, names.layer_param_name(layer_number, suffix)))

        norm_args = dict(sequence_parallel=sequence_parallel, params_dtype=config.torch_dtype, device=device,
                         force_torch_kernels=force_torch_kernels)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, **norm_args)
        self.self_attention = SelfAttention(config, sequence_parallel=sequence_parallel,
                                            qkv_init=init(names.QKV, std), output_init=init(names.PROJ, output_std),
                                            device=device, force_torch_kernels=force_torch_kernels)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, config.norm_eps, **norm_args)
        self.mlp = SwiGLUMLP(config, sequence_parallel=sequence_parallel, fc1_init=init(names.FC1, std),
                             fc2_init=init(names.FC2, output_std), device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[s, b, h] (or [s/t, b, h] with sequence parallel) -> the same shape."""
        x = x + self.self_attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class LanguageModelEmbedding(nn.Module):
    """The token embedding of the first stage (megatron-core's `embedding`; no position table with RoPE)."""

    def __init__(self, word_embeddings: VocabParallelEmbedding):
        super().__init__()
        self.word_embeddings = word_embeddings

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[s, b] token ids -> [s, b, h] (or [s/t, b, h] with sequence parallel)."""
        return self.word_embeddings(token_ids)


class TransformerBlock(nn.Module):
    """A stage's decoder layers, numbered from 0 (megatron-core's `decoder`), and the final norm on the last stage."""

    def __init__(self, layers: list[LlamaDecoderLayer], final_layernorm: RMSNorm | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = final_layernorm


class LlamaModel(nn.Module):
    """One pipeline stage (the whole model when pp=1) of a tensor-parallel Llama.

    `parallel` defaults to the sizes of megagrow.parallel.state (sequence parallelism off);
    `pre_process`, `post_process` and `layer_range` default to this rank's pipeline stage
    holding an equal share of the layers.

    Speed options, none of which changes the result: `recompute_granularity` ('full' or
    'selective', with `recompute_method`/`recompute_num_layers` choosing the layers for full;
    megagrow.model.recompute), `cross_entropy_chunk_size` (tokens per chunk of
    the head and loss, megagrow.model.chunked_loss; None or 0 = all at once), `compile_mlp`
    (torch.compile the SwiGLU gate, megagrow.model.swiglu).
    """

    def __init__(self, config: ModelConfig, parallel: ParallelConfig | None = None, *,
                 pre_process: bool | None = None, post_process: bool | None = None,
                 layer_range: tuple[int, int] | None = None, seed: int = 1234,
                 device: torch.device | str | None = None, force_torch_kernels: bool | None = None,
                 recompute_granularity: str | None = None, cross_entropy_chunk_size: int | None = None,
                 compile_mlp: bool = False, recompute_method: str | None = None,
                 recompute_num_layers: int | None = None):
        super().__init__()
        recompute.validate_granularity(recompute_granularity)
        validate_chunk_size(cross_entropy_chunk_size)
        parallel = parallel or ParallelConfig(tp=state.tp_size(), pp=state.pp_size(), dp=state.dp_size())
        if parallel.tp != state.tp_size():
            raise UserError(f"parallel config asks for tp={parallel.tp} but the process groups were initialized "
                            f"with tp={state.tp_size()}")
        validate_parallel(config, parallel)
        self.config = config
        self.sequence_parallel = parallel.sequence_parallel and parallel.tp > 1
        self.pre_process = state.is_first_stage() if pre_process is None else pre_process
        self.post_process = state.is_last_stage() if post_process is None else post_process
        if layer_range is None:
            stage_layers = partition_layers(config.num_layers, parallel.pp)[state.pp_rank()]
            layer_range = (stage_layers.start, stage_layers.stop)
        start, end = layer_range
        if not 0 <= start <= end <= config.num_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside the model's {config.num_layers} layers")
        self.layer_range = (start, end)
        self.layer_offset = start  # global number of decoder.layers.0
        self.padded_vocab_size = padded_vocab_size(config.vocab_size, config.make_vocab_size_divisible_by,
                                                   parallel.tp)
        dtype = config.torch_dtype
        embedding_init = _padded_rows_init(
            normal_init(config.init_method_std, derive_seed(seed, EMBEDDING_INIT_KEY)), config.vocab_size)

        self.embedding = None
        if self.pre_process:
            self.embedding = LanguageModelEmbedding(VocabParallelEmbedding(
                self.padded_vocab_size, config.hidden_size, sequence_parallel=self.sequence_parallel,
                init_method=embedding_init, params_dtype=dtype, device=device))
        self.rotary = RotaryEmbedding(config.head_dim, config.max_positions, config.rope_theta)
        layers = [LlamaDecoderLayer(config, number, sequence_parallel=self.sequence_parallel, seed=seed, device=device,
                                    force_torch_kernels=force_torch_kernels) for number in range(start, end)]
        final_layernorm = None
        if self.post_process:
            final_layernorm = RMSNorm(config.hidden_size, config.norm_eps, sequence_parallel=self.sequence_parallel,
                                      params_dtype=dtype, device=device, force_torch_kernels=force_torch_kernels)
        self.decoder = TransformerBlock(layers, final_layernorm)
        self.output_layer = None
        if self.post_process:
            shares_embedding = config.tie_embeddings and self.embedding is not None
            # Tied but on another stage than the embedding: a copy drawn from the same seed;
            # the pipeline keeps the copies equal by summing their grads over the embedding group.
            head_init = embedding_init if config.tie_embeddings else _padded_rows_init(
                normal_init(config.init_method_std, derive_seed(seed, names.OUTPUT_LAYER)), config.vocab_size)
            self.output_layer = ColumnParallelLinear(config.hidden_size, self.padded_vocab_size,
                                                     sequence_parallel=self.sequence_parallel, init_method=head_init,
                                                     params_dtype=dtype, device=device, skip_weight=shares_embedding)
        self.layer_recompute = recompute.LayerRecompute.from_flags(recompute_granularity, recompute_method,
                                                                   recompute_num_layers)
        for layer in self.decoder.layers:
            layer.self_attention.recompute_core_attention = recompute_granularity == recompute.SELECTIVE
            layer.mlp.compile_gate = compile_mlp
        self.cross_entropy_chunk_size = chunk = cross_entropy_chunk_size or None
        log_choice("activation recompute", recompute_granularity or "off",
                   f"--recompute-granularity {recompute_granularity}" if recompute_granularity else "not requested")
        log_choice("cross entropy", f"in chunks of {chunk} tokens" if chunk else "all tokens at once",
                   f"--cross-entropy-chunk-size {chunk}" if chunk else "not requested")
        if config.tie_embeddings:
            for module in (self.embedding and self.embedding.word_embeddings, self.output_layer):
                if module is not None and module.weight is not None:
                    module.weight.shared_embedding = True

    def _output_weight(self) -> torch.Tensor:
        if self.output_layer.weight is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor | None = None, *, hidden_states: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                gather_logits: bool = True) -> torch.Tensor:
        """Run this stage.

        First stage takes input_ids [b, s]; later stages take hidden_states [s, b, h] (or
        [s/t, b, h] with sequence parallel) from the previous stage. Non-last stages return
        hidden states of that shape. The last stage returns, given labels [b, s], the per-token
        loss [b, s]; otherwise logits [b, s, vocab_size] (gather_logits) or this rank's
        padded vocabulary shard [b, s, padded_vocab/t].
        """
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            seq_length = input_ids.size(1)
            x = self.embedding(input_ids.t())
        else:
            if hidden_states is None:
                raise ValueError("a stage without the embedding needs hidden_states from the previous stage")
            x = hidden_states
            seq_length = x.size(0) * (state.tp_size() if self.sequence_parallel else 1)
        cos, sin = self.rotary(seq_length, position_ids, device=x.device)
        if self.layer_recompute is not None:
            x = self.layer_recompute.run(list(self.decoder.layers), x, cos, sin)
        else:
            for layer in self.decoder.layers:
                x = layer(x, cos, sin)
        if not self.post_process:
            return x

        if labels is not None and self.cross_entropy_chunk_size:
            loss = chunked_head_loss(self.decoder.final_layernorm(x), labels.t(), self._output_weight(), self.output_layer.bias,
                                     self.config.vocab_size, self.cross_entropy_chunk_size, self.sequence_parallel)
            return loss.t()
        logits = self.output_layer(self.decoder.final_layernorm(x), weight=self._output_weight())  # [s, b, padded_vocab/t]
        if labels is not None:
            loss = vocab_parallel_cross_entropy(logits, labels.t(), self.config.vocab_size)
            return loss.t()
        if gather_logits:
            logits = gather_from_tp_region(logits)[..., :self.config.vocab_size]
        return logits.transpose(0, 1)
