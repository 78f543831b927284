"""When to grow and by how much: the G_stack guideline of arXiv 2405.15319 and the token budgets it implies.

The paper (Du et al., "Stacking Your Transformers: A Closer Look at Model Growth for Efficient
LLM Pre-Training", 2024) fits the growth timing d (tokens the base model is trained on before
it is stacked) as

    log10(d) = a * log10(N) + b / log10(C) + c,    a = 0.88, b = 163.27, c = -5.74

with N the parameters of the target (grown) model and C the compute of the whole run in
FLOPs, and fixes the growth factor at g = 4. Sources: the constants and g = 4 are as stated
in the authors' repository README (github.com/tongxuluo/prts, section "Pretraining on Slurm
Cluster"); the paper text itself could not be read here. The same README tabulates d for
Llama models (Llama2-7B with 2T tokens: 11.11B; Llama2-13B, 2T: 15.84B; Llama2-70B, 2T:
42.48B; Llama3-8B, 15T: 6.58B). Those four rows are reproduced to their printed precision
only with C = 6 * N * D, D the tokens of the planned run (tests/test_growth_plan.py), so that
is how C is defined here. The constants can be overridden (GrowthTimingLaw) should a later
revision of the paper change them. The fit comes from the paper's runs (410M to 7B targets);
far outside that range it is an extrapolation.

Budget split (same 6 * N * D accounting, so the plan adds up to C): the base model has the
target's width and 1/g of its layers, and trains on d tokens costing 6 * N_base * d; the
grown model spends the rest, (C - 6 * N_base * d) / (6 * N) tokens. The scratch reference is
C / (6 * N) tokens. With a target ModelConfig, N_base is counted exactly (megagrow.config.
num_parameters); from a bare parameter count it is approximated as N / g, which ignores that
the embeddings are not stacked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megagrow.config import ModelConfig, num_parameters
from megagrow.errors import UserError

PAPER_GROWTH_FACTOR = 4
# The smallest target model in the paper's experiments; below it the timing law is an extrapolation.
SMALLEST_STUDIED_TARGET = 410e6
# Factors considered when the target's depth is not divisible by the paper's g = 4.
_FACTOR_RANGE = range(2, 9)


@dataclass(frozen=True)
class GrowthTimingLaw:
    """log10(d) = a * log10(N) + b / log10(C) + c: tokens d to train the base model on before growing it."""

    a: float = 0.88
    b: float = 163.27
    c: float = -5.74

    @property
    def is_paper(self) -> bool:
        """True when the constants are the published ones."""
        return self == GrowthTimingLaw()

    def growth_tokens(self, target_params: float, compute_flops: float) -> float:
        """Growth timing d in tokens for a target of `target_params` parameters and a run of `compute_flops` FLOPs."""
        if target_params <= 0:
            raise UserError(f"target parameter count must be positive, got {target_params:g}")
        if compute_flops <= 1:
            raise UserError(f"compute must be more than 1 FLOP (the law divides by log10 C), got {compute_flops:g}")
        return 10 ** (self.a * math.log10(target_params) + self.b / math.log10(compute_flops) + self.c)

    def describe(self) -> str:
        """The law with its constants, as one line."""
        sign = "-" if self.c < 0 else "+"
        return f"log10(d) = {self.a:g} * log10(N) + {self.b:g} / log10(C) {sign} {abs(self.c):g}"


def training_compute(params: float, tokens: float) -> float:
    """Training FLOPs as the guideline counts them: 6 * N * D."""
    return 6.0 * params * tokens


def recommend_growth_factor(num_layers: int | None = None) -> int:
    """The paper's g = 4; for a depth 4 does not divide, the divisor in 2..8 closest to 4 (the smaller on ties)."""
    if num_layers is None or num_layers % PAPER_GROWTH_FACTOR == 0:
        return PAPER_GROWTH_FACTOR
    divisors = [g for g in _FACTOR_RANGE if num_layers % g == 0]
    if not divisors:
        raise UserError(f"{num_layers} layers cannot be stacked from a smaller base by any factor between 2 and 8; "
                        f"choose a target depth divisible by {PAPER_GROWTH_FACTOR}")
    return min(divisors, key=lambda g: (abs(g - PAPER_GROWTH_FACTOR), g))


def base_config(target: ModelConfig, growth_factor: int) -> ModelConfig:
    """The base model G_stack grows into `target`: the same width, 1/g of the layers."""
    if growth_factor < 2:
        raise UserError(f"growth factor must be at least 2, got {growth_factor}")
    if target.num_layers % growth_factor:
        raise UserError(f"the target's {target.num_layers} layers are not divisible by growth factor {growth_factor}; "
                        f"try --growth-factor {recommend_growth_factor(target.num_layers)}")
    return target.replace(num_layers=target.num_layers // growth_factor)


@dataclass(frozen=True)
class GrowthPlan:
    """A G_stack run: the base model and its tokens before growth, the grown model and its tokens after."""

    target_params: float
    compute_flops: float
    growth_factor: int
    law: GrowthTimingLaw
    base_params: float  # exact with a target config, else target_params / growth_factor
    growth_tokens: float  # d: tokens for the base model
    grown_tokens: float  # tokens for the grown model after stacking
    target_config: ModelConfig | None = None
    base_config: ModelConfig | None = None

    @property
    def base_flops(self) -> float:
        """Compute spent on the base model."""
        return training_compute(self.base_params, self.growth_tokens)

    @property
    def grown_flops(self) -> float:
        """Compute spent on the grown model."""
        return training_compute(self.target_params, self.grown_tokens)

    @property
    def total_tokens(self) -> float:
        """Tokens of the whole run, before and after growth."""
        return self.growth_tokens + self.grown_tokens

    @property
    def scratch_tokens(self) -> float:
        """Tokens the same compute buys when the target is trained from scratch."""
        return self.compute_flops / (6.0 * self.target_params)


def plan_growth(compute_flops: float, target_params: float | None = None, target_config: ModelConfig | None = None,
                growth_factor: int | None = None, law: GrowthTimingLaw | None = None) -> GrowthPlan:
    """The G_stack plan for a run of `compute_flops` FLOPs on a target given by its size, its config, or both."""
    law = law or GrowthTimingLaw()
    if target_params is None and target_config is None:
        raise UserError("give the target model's size (--target-params) or its shape (--model-preset)")
    if target_params is None:
        target_params = num_parameters(target_config)
    if growth_factor is None:
        growth_factor = recommend_growth_factor(None if target_config is None else target_config.num_layers)
    if growth_factor < 2:
        raise UserError(f"growth factor must be at least 2, got {growth_factor}")
    d = law.growth_tokens(target_params, compute_flops)
    base = None if target_config is None else base_config(target_config, growth_factor)
    base_params = target_params / growth_factor if base is None else num_parameters(base)
    remaining = compute_flops - training_compute(base_params, d)
    if remaining <= 0:
        raise UserError(f"the base model alone needs {training_compute(base_params, d):.3g} FLOPs to reach the growth "
                        f"point ({format_count(d)} tokens), more than the compute budget {compute_flops:.3g}; "
                        f"raise --compute")
    return GrowthPlan(target_params=target_params, compute_flops=compute_flops, growth_factor=growth_factor, law=law,
                      base_params=base_params, growth_tokens=d, grown_tokens=remaining / (6.0 * target_params),
                      target_config=target_config, base_config=base)


def format_count(value: float) -> str:
    """A parameter or token count with a unit suffix: 11.11B, 2.00T."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"
