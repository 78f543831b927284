"""Model growth: operators that turn a trained small model into a larger one, and when to apply them."""

from megagrow.growth.operators import OPERATORS, GrowthOperator, GrowthSpec, grow, grown_config, layer_sources

__all__ = ["OPERATORS", "GrowthOperator", "GrowthSpec", "grow", "grown_config", "layer_sources"]
