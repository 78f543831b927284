"""Depth growth: a model of L layers becomes one of g*L layers with the same width.

Where the grown layers come from (`depth_layer_sources`):

    stack        target layer t reads base layer t mod L:   0 1 .. L-1 | 0 1 .. L-1 | ...
                 (G_stack of arXiv 2405.15319: the whole block sequence repeated g times)
    interpolate  target layer t reads base layer t // g:    0 0 .. 1 1 .. L-1 L-1
                 (each layer duplicated in place)

What the grown layers hold:

    direct  every target layer is a copy of its source layer (G_direct; with the stack layout
            this is G_stack). Embedding, final norm and head are copied. Not function
            preserving: each copy adds its residual branch again.
    zero    the first copy of each base layer is kept, the others are new layers whose
            residual branches are silent: attention output projection (dense) and MLP down
            projection are zero, so the layer is the identity and the grown model computes
            exactly the base model's function. Their input projections (qkv, gate/up) are
            drawn from the model's initialisation and their norms are ones (the model's
            initialisation too). Zeroing the input projections as well would leave the
            layer at a saddle: with both sides zero every gradient of the layer is zero,
            and it would never train.
    random  the first copy of each base layer is kept, the others are fresh layers drawn
            exactly as LlamaModel would draw them for the grown config: std for the input
            projections, std / sqrt(2 * g*L) for the output projections (the depth after
            growth), ones for the norms. The kept layers are not rescaled.

New layers are seeded from `seed` and their global names (megagrow.parallel.layers.derive_seed),
so the sharded growth tool, which builds one layer at a time, produces the same tensors as
`grow_depth` on the full state dict.
"""

from __future__ import annotations

from typing import Mapping

import torch

from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.growth.tensors import (
    DIRECT,
    FILLS,
    LAYER_TENSORS,
    OUTPUT_PROJECTIONS,
    ZERO,
    check_state_dict,
    init_tensor,
    layer_tensor_name,
    layer_tensor_shapes,
    split_layer_name,
)

STACK, INTERPOLATE = "stack", "interpolate"
LAYOUTS = (STACK, INTERPOLATE)


def grown_depth_config(config: ModelConfig, factor: int) -> ModelConfig:
    """The config after depth growth by `factor`: `factor` times the layers, everything else equal."""
    return config.replace(num_layers=config.num_layers * factor)


def depth_layer_sources(num_layers: int, factor: int, layout: str = STACK,
                        copy_every_layer: bool = True) -> list[int | None]:
    """Source base layer of each of the factor*num_layers grown layers; None where the layer is new.

    With `copy_every_layer` (G_direct) every grown layer has a source; otherwise only the first
    copy of each base layer keeps it and the other positions are new layers.
    """
    if layout not in LAYOUTS:
        raise UserError(f"depth layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if factor < 2:
        raise UserError(f"depth growth factor must be at least 2, got {factor}")
    sources: list[int | None] = []
    for target in range(num_layers * factor):
        if layout == STACK:
            source, first_copy = target % num_layers, target < num_layers
        else:
            source, first_copy = target // factor, target % factor == 0
        sources.append(source if copy_every_layer or first_copy else None)
    return sources


def new_layer(layer: int, config: ModelConfig, fill: str, seed: int,
              dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors (names inside the layer) of new layer number `layer` of the grown model `config`."""
    if fill not in FILLS or fill == DIRECT:
        raise ValueError(f"a new layer is filled 'zero' or 'random', not {fill!r}")
    dtype = dtype or config.torch_dtype
    tensors = {}
    for name, shape in layer_tensor_shapes(config).items():
        if fill == ZERO and name in OUTPUT_PROJECTIONS:
            tensors[name] = torch.zeros(shape, dtype=dtype)
        else:
            tensors[name] = init_tensor(layer_tensor_name(layer, name), shape, config, seed).to(dtype)
    return tensors


def grow_layer(source: Mapping[str, torch.Tensor] | None, layer: int, grown_config: ModelConfig, fill: str,
               seed: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of grown layer `layer`: a copy of its source layer's tensors, or a new layer when source is None."""
    if source is None:
        return new_layer(layer, grown_config, fill, seed, dtype)
    return {name: source[name].clone() for name in LAYER_TENSORS}


def grow_depth(state_dict: Mapping[str, torch.Tensor], config: ModelConfig, factor: int, layout: str, fill: str,
               seed: int) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Grow a full state dict in depth; returns the grown state dict and config."""
    check_state_dict(dict(state_dict), config)
    grown = grown_depth_config(config, factor)
    sources = depth_layer_sources(config.num_layers, factor, layout, copy_every_layer=fill == DIRECT)
    dtype = next(iter(state_dict.values())).dtype
    result = {name: tensor.clone() for name, tensor in state_dict.items() if split_layer_name(name) is None}
    for target, source in enumerate(sources):
        source_tensors = None if source is None else {
            name: state_dict[layer_tensor_name(source, name)] for name in LAYER_TENSORS}
        for name, tensor in grow_layer(source_tensors, target, grown, fill, seed, dtype).items():
            result[layer_tensor_name(target, name)] = tensor
    return result, grown
