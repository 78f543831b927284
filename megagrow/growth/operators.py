"""Growth operators by name, on full (unsharded) state dicts: `grow(state_dict, config, spec)`.

The four atomic operators of arXiv 2405.15319 ("Stacking Your Transformers", Du et al. 2024),
each in depth and in width:

    name               paper             function preserved (test in tests/test_growth_operators.py)
    depth:stack        G_direct = G_stack   no  (exact per-layer copies: test_stack_copies_every_layer)
    depth:interpolate  G_direct, each layer duplicated in place   no
    depth:zero         G_zero            yes, exactly (test_function_preserving_operators)
    depth:random       G_random          no
    width:direct       G_direct (split)  yes, exactly, scope ffn and all (test_function_preserving_operators)
    width:zero         G_zero            scope ffn: exactly; scope all: up to RMSNorm's eps
                                         (test_width_zero_is_exact_without_eps)
    width:random       G_random          no

G_learn (LiGO's learned linear expansion) needs training the expansion on data and is not done.
What each operator puts in the new tensors, and why, is in megagrow/growth/depth.py and
megagrow/growth/width.py. The paper found depth-wise G_direct (G_stack) to be the one that
accelerates pre-training; the others are here to reproduce its comparison.

The sharded growth tool (tools/stack_checkpoint.py, megagrow/growth/stacking.py) streams a
checkpoint instead of loading it whole, for depth operators only: it walks
`layer_sources(spec, num_layers)` and calls `depth.grow_layer` per target layer, which gives
exactly what `grow` gives. It refuses width operators; grow width with `grow` on a full state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from megagrow.config import ModelConfig
from megagrow.errors import UserError
from megagrow.growth.depth import INTERPOLATE, LAYOUTS, STACK, depth_layer_sources, grow_depth, grown_depth_config
from megagrow.growth.tensors import DIRECT, RANDOM, ZERO
from megagrow.growth.width import ALL, SCOPES, grow_width, grown_width_config

DEPTH, WIDTH = "depth", "width"


@dataclass(frozen=True)
class GrowthOperator:
    """A registered operator: which dimension it grows, how new tensors are filled, and its name in the paper."""

    name: str
    dimension: str
    fill: str
    paper_name: str
    # Depth operators whose name fixes where the copies go; None lets GrowthSpec.layout choose.
    fixed_layout: str | None = None


OPERATORS: dict[str, GrowthOperator] = {op.name: op for op in (
    GrowthOperator("depth:stack", DEPTH, DIRECT, "G_direct (G_stack)", fixed_layout=STACK),
    GrowthOperator("depth:interpolate", DEPTH, DIRECT, "G_direct, interpolated", fixed_layout=INTERPOLATE),
    GrowthOperator("depth:zero", DEPTH, ZERO, "G_zero"),
    GrowthOperator("depth:random", DEPTH, RANDOM, "G_random"),
    GrowthOperator("width:direct", WIDTH, DIRECT, "G_direct (neuron splitting)"),
    GrowthOperator("width:zero", WIDTH, ZERO, "G_zero"),
    GrowthOperator("width:random", WIDTH, RANDOM, "G_random"),
)}


@dataclass(frozen=True)
class GrowthSpec:
    """One growth step: the operator, its factor and its options."""

    operator: str = "depth:stack"
    # g: layers (depth) or hidden/heads/FFN (width) are multiplied by it.
    factor: int = 4
    # Depth: where the kept and new layers go ("stack" or "interpolate"); None: the operator's own
    # (stack for depth:zero and depth:random).
    layout: str | None = None
    # Width: "all" grows hidden size, heads and FFN; "ffn" only the FFN.
    scope: str = ALL
    # Seeds new tensors as LlamaModel(seed=seed) would, by their global names.
    seed: int = 1234

    def __post_init__(self):
        if self.operator not in OPERATORS:
            raise UserError(f"unknown growth operator {self.operator!r}; choose one of {', '.join(OPERATORS)} "
                            f"(G_learn is not implemented)")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 2:
            raise UserError(f"growth factor must be an integer of at least 2, got {self.factor!r}")
        op = OPERATORS[self.operator]
        if self.layout is not None:
            if op.dimension != DEPTH:
                raise UserError(f"--layout applies to depth operators, not {self.operator}")
            if self.layout not in LAYOUTS:
                raise UserError(f"depth layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
            if op.fixed_layout not in (None, self.layout):
                raise UserError(f"{self.operator} always uses the {op.fixed_layout} layout; for the {self.layout} "
                                f"layout use depth:{self.layout}")
        if self.scope not in SCOPES:
            raise UserError(f"width scope {self.scope!r} is not one of {', '.join(SCOPES)}")

    @property
    def growth_operator(self) -> GrowthOperator:
        """The registered operator this spec names."""
        return OPERATORS[self.operator]

    @property
    def depth_layout(self) -> str:
        """Layout of a depth operator: its fixed one, else the spec's, else stack."""
        return self.growth_operator.fixed_layout or self.layout or STACK


def grown_config(config: ModelConfig, spec: GrowthSpec) -> ModelConfig:
    """The model config after growing by `spec`."""
    if spec.growth_operator.dimension == DEPTH:
        return grown_depth_config(config, spec.factor)
    return grown_width_config(config, spec.factor, spec.scope)


def layer_sources(spec: GrowthSpec, num_layers: int) -> list[int | None]:
    """For a depth spec: the base layer each grown layer is copied from, None where it is new."""
    op = spec.growth_operator
    if op.dimension != DEPTH:
        raise ValueError(f"{spec.operator} is not a depth operator")
    return depth_layer_sources(num_layers, spec.factor, spec.depth_layout, copy_every_layer=op.fill == DIRECT)


def grow(state_dict: Mapping[str, torch.Tensor], config: ModelConfig,
         spec: GrowthSpec) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Apply `spec` to a full state dict of a model with `config`; returns the grown state dict and config."""
    op = spec.growth_operator
    if op.dimension == DEPTH:
        return grow_depth(state_dict, config, spec.factor, spec.depth_layout, op.fill, spec.seed)
    return grow_width(state_dict, config, spec.factor, spec.scope, op.fill, spec.seed)
