"""--recompute-method uniform|block with --recompute-num-layers: Megatron's layer choice, same loss and grads."""

import pytest
import torch

from megagrow.arguments import parse_args
from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.model.llama import LlamaModel
from megagrow.parallel.layers import gather_full

CONFIG = ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                     vocab_size=40, seq_length=10, make_vocab_size_divisible_by=8)


def _model(layer_range=(0, 4), **options):
    return LlamaModel(CONFIG, seed=5, force_torch_kernels=True, pre_process=True, post_process=True,
                      layer_range=layer_range, **options)


def _loss_and_grads(**options):
    model = _model(**options)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_length + 1), generator=torch.Generator().manual_seed(1))
    loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    loss.mean().backward()
    return loss.detach(), {name: gather_full(p.grad, p) for name, p in model.named_parameters()}


@pytest.mark.parametrize("method, num_layers", [("uniform", 1), ("uniform", 2), ("uniform", 3), ("block", 1),
                                                ("block", 3), ("block", 9)])
def test_same_loss_and_grads_as_without_recompute(method, num_layers):
    loss, grads = _loss_and_grads(recompute_granularity="full", recompute_method=method,
                                  recompute_num_layers=num_layers)
    reference_loss, reference_grads = _loss_and_grads()
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=0)  # same kernels, same inputs: bitwise
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=0, atol=0, msg=name)


def _layers_run_in_backward(layer_range=(0, 4), **options):
    """Global numbers of the layers whose forward runs again during backward, in the order they run."""
    model = _model(layer_range, **options)
    log, phase = [], {"backward": False}
    for local, layer in enumerate(model.decoder.layers):
        number = model.layer_offset + local
        layer.register_forward_pre_hook(lambda *_, n=number: log.append(n) if phase["backward"] else None)
    tokens = torch.randint(0, CONFIG.vocab_size, (1, CONFIG.seq_length + 1), generator=torch.Generator().manual_seed(2))
    loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
    phase["backward"] = True
    loss.backward()
    return log


def test_uniform_recomputes_chunks_of_consecutive_layers():
    # Backward walks the chunks last to first; inside a chunk the layers rerun in forward order.
    assert _layers_run_in_backward(recompute_granularity="full", recompute_method="uniform",
                                   recompute_num_layers=2) == [2, 3, 0, 1]
    assert _layers_run_in_backward(recompute_granularity="full", recompute_method="uniform",
                                   recompute_num_layers=3) == [3, 0, 1, 2]  # a shorter last chunk
    assert _layers_run_in_backward(recompute_granularity="full") == [3, 2, 1, 0]  # no method: chunks of one


def test_block_recomputes_only_the_first_layers_of_the_stage():
    assert _layers_run_in_backward(recompute_granularity="full", recompute_method="block",
                                   recompute_num_layers=2) == [1, 0]
    # A later pipeline stage counts from its own first layer.
    assert _layers_run_in_backward((2, 4), recompute_granularity="full", recompute_method="block",
                                   recompute_num_layers=1) == [2]
    assert _layers_run_in_backward() == []


FLAGS = ["--model-preset", "tiny", "--mock-data", "--train-iters", "1"]


def test_flags_reach_the_train_config_and_megatron_shorthands_expand():
    train = parse_args(FLAGS + ["--recompute-granularity", "full", "--recompute-method", "block",
                                "--recompute-num-layers", "3"]).train
    assert (train.recompute_granularity, train.recompute_method, train.recompute_num_layers) == ("full", "block", 3)
    # Megatron-DeepSpeed's --checkpoint-activations: full, uniform, --checkpoint-num-layers per chunk.
    train = parse_args(FLAGS + ["--checkpoint-activations", "--checkpoint-num-layers", "2"]).train
    assert (train.recompute_granularity, train.recompute_method, train.recompute_num_layers) == ("full", "uniform", 2)
    assert parse_args(FLAGS + ["--recompute-activations"]).train.recompute_granularity == "selective"


@pytest.mark.parametrize("extra, message", [
    (["--recompute-method", "uniform"], "--recompute-method applies to --recompute-granularity full only"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "2"], "--recompute-num-layers applies to"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "0"], "must be positive"),
    (["--checkpoint-activations", "--recompute-granularity", "selective"], "--checkpoint-activations means"),
])
def test_contradictions_are_refused_in_one_line(extra, message):
    with pytest.raises(UserError, match=message) as info:
        parse_args(FLAGS + extra)
    assert "\n" not in str(info.value)
