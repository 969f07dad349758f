"""A jax.profiler trace of chosen training steps: `train.py --profile START:STOP`.

Steps START to STOP (numbered from 1 as in metrics.jsonl, both included) are traced on process
0 into RUN_DIR/profile/ (RunDir.profile):

    RUN_DIR/profile/plugins/profile/<time>/<host>.xplane.pb        TensorBoard's profile plugin, XProf
    RUN_DIR/profile/plugins/profile/<time>/perfetto_trace.json.gz  https://ui.perfetto.dev

The trace starts just before step START is dispatched and stops once step STOP has finished on
the device (the one wait on the device this adds, at the end of the traced window). Each traced
step is marked with jax.profiler.StepTraceAnnotation, so the profile plugin shows step times.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import jax

from hnet.errors import ConfigError, RunError


@dataclass(frozen=True)
class ProfileSteps:
    """The steps to trace: first to last, both included (1-based)."""

    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> ProfileSteps:
        """ "START:STOP" -> ProfileSteps; anything else is a one-line ConfigError."""
        start, sep, stop = text.partition(":")
        if not sep or not start.strip().isdigit() or not stop.strip().isdigit():
            raise ConfigError(f"--profile {text!r}: expected START:STOP, two step numbers such as 10:20")
        steps = cls(int(start), int(stop))
        if not 1 <= steps.first <= steps.last:
            raise ConfigError(f"--profile {text!r}: need 1 <= START <= STOP")
        return steps

    def check(self, first_step: int, last_step: int) -> None:
        """The traced steps must start within the steps this call runs (first_step to last_step);
        a STOP past the end traces to the end. Raises RunError otherwise."""
        if not first_step <= self.first <= last_step:
            raise RunError(
                f"--profile {self.first}:{self.last}: START must be a step this call runs ({first_step} to {last_step})"
            )


class StepProfiler:
    """Traces the steps of `steps` into `log_dir` when `enabled` (process 0); does nothing when
    `steps` is None.

        with profiler.annotate(step):      # step about to run (1-based)
            outputs = train_step(...)
        profiler.finish_step(step, outputs)
        ...
        profiler.close(state)              # stops a trace still running (the run ended early)

    As a context manager it also stops the trace when the loop ends by an error.
    """

    def __init__(self, steps: ProfileSteps | None, log_dir: Path, enabled: bool):
        self.steps = steps if enabled else None
        self.log_dir = log_dir
        self.tracing = False

    def annotate(self, step: int):
        """Context for dispatching `step`: starts the trace at the first traced step and marks
        each traced step."""
        if self.steps is None or not self.steps.first <= step <= self.steps.last:
            return contextlib.nullcontext()
        if step == self.steps.first:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            self.tracing = True
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def finish_step(self, step: int, outputs) -> None:
        """After `step` was dispatched: at the last traced step, wait for `outputs` (the step's
        results) and stop the trace."""
        if self.tracing and step == self.steps.last:
            self.close(outputs)

    def close(self, outputs=None) -> None:
        """Stop a trace that is running, after waiting for `outputs`."""
        if self.tracing:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.tracing = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()  # the loop ended by an error: stop without waiting for the device
