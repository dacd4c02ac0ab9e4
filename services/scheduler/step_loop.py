"""One engine step, the same everywhere: ``schedule() -> execute(plan) -> update(plan, result)``.

The scheduler service (over ZeroMQ), the offline engine (in process), the simulator and the
test harness all drive the scheduler through ``run_step``; they differ only in how a plan is
executed and in what they do with a failed step. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

from shared.messages import ExecutorError, RequestOutput, StepPlan, StepResult


@dataclass
class StepFailed:
    """The plan did not run (the executor answered ExecutorError) or its result was refused by
    ``update``; ``message`` says which, with the step id."""

    plan: StepPlan
    message: str


def run_step(scheduler, execute: Callable[[StepPlan], Union[StepResult, ExecutorError]],
             defer_masks: bool = False) -> Optional[Union[list[RequestOutput], StepFailed]]:
    """One step: None when there was nothing to schedule, else the outputs or a StepFailed.
    Whatever ``execute`` raises (e.g. the service's ExecutorLost) reaches the caller. With
    ``defer_masks``, ``execute`` sends the grammar masks itself (``scheduler.step_masks``)."""
    plan = scheduler.schedule(defer_masks=defer_masks)
    if plan is None:
        return None
    result = execute(plan)
    if isinstance(result, ExecutorError):
        return StepFailed(plan, f"executor error at step {plan.step_id}: {result.message}")
    try:
        return scheduler.update(plan, result)
    except (ValueError, KeyError) as e:
        return StepFailed(plan, f"bad executor result at step {plan.step_id}: {e}")
