"""The base run's state carried into a grown checkpoint, so training resumes with the grown model.

A grown shard with run state holds, besides the model, what training restores on a resume:
the base's progress (iteration, consumed samples; also Megatron's `args.consumed_train_samples`
and `iteration`), LR schedule position (megagrow's and Megatron's records), RNG record, and
an optimizer record in model space (megagrow/checkpoint/optimizer_layout.py).

The optimizer starts afresh (the record is None: moments at zero, as in a new run) unless
`stack_optimizer_state`, which gives every grown parameter the Adam moments, step count and
fp32 master of the base parameter it was copied from — G_stack applied to the optimizer.
Because the state is kept per parameter, this works whatever optimizer layout saved the base
(megagrow's plain or distributed optimizer, DeepSpeed at any ZeRO stage) and whatever layout
resumes the grown model. A Megatron-LM base carries its progress, LR schedule and RNG, and its
Adam state wherever it is kept per parameter (not its distributed optimizer's buffer layouts).
"""

from __future__ import annotations

from dataclasses import dataclass

from megagrow.checkpoint.megatron_state import MEGAGROW_KEY
from megagrow.checkpoint.optimizer_layout import ADAM_MOMENTS, STATE_KINDS
from megagrow.checkpoint.reader import CheckpointReader, GroupReader
from megagrow.errors import UserError
from megagrow.growth.operators import GrowthSpec
from megagrow.growth.tensors import DIRECT


@dataclass(frozen=True)
class RunStateOptions:
    """What a grown checkpoint carries over from the base run besides the weights."""

    # Adam moments, step counts and fp32 masters stacked like the weights; else a fresh optimizer.
    stack_optimizer_state: bool = False


class RunStateWriter:
    """What every grown shard carries of the base run: its position, records, and (stacked) optimizer state."""

    def __init__(self, reader: CheckpointReader, spec: GrowthSpec, options: RunStateOptions):
        position = reader.run_position()
        if position is None:
            raise UserError(f"{reader.directory}: the base checkpoint holds a model only (exported or converted), no "
                            f"run state to carry over; grow it without run state")
        if options.stack_optimizer_state:
            if spec.growth_operator.fill != DIRECT:
                raise UserError(f"--stack-optimizer-state needs every grown layer to copy a base layer "
                                f"(depth:stack or depth:interpolate), not {spec.operator}")
            if not reader.has_optimizer_state:
                raise UserError(f"{reader.directory}: holds no Adam state per parameter (saved with --no-save-optim, "
                                f"or by Megatron-LM's distributed optimizer in its buffer layout); grow it with "
                                f"--carry-run-state (fresh optimizer)")
        self.reader, self.options, self.position = reader, options, position
        common = reader.common
        self.rng = common.get("rng_state")
        self.opt_param_scheduler = common.get("opt_param_scheduler")
        self.scheduler = common.get(MEGAGROW_KEY, {}).get("scheduler", {"num_steps": position.scheduler_steps or 0})

    @property
    def stacks_moments(self) -> bool:
        """Whether the grown shards get the base's Adam state (else a fresh optimizer)."""
        return self.options.stack_optimizer_state

    def state_kinds(self) -> tuple[str, ...]:
        """The optimizer tensors each grown parameter gets: the moments, and the masters when they are not the weights."""
        return ADAM_MOMENTS if self.reader.config.params_dtype == "float32" else STATE_KINDS

    def base_state_reader(self, kind: str) -> GroupReader:
        """The base's optimizer state of `kind`, read by groups like its weights."""
        return self.reader.group_reader(kind)

    @property
    def optimizer_steps(self) -> int:
        """Adam steps the base optimizer had taken (every stacked parameter keeps them)."""
        return self.reader.optimizer_steps()

    def records(self) -> dict:
        """The run-state entries of a grown shard besides its optimizer: megagrow's and Megatron's records."""
        return {"progress": dict(self.position.progress), "scheduler": self.scheduler, "rng": self.rng,
                "opt_param_scheduler": self.opt_param_scheduler}
