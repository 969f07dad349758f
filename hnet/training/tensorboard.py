"""TensorBoard event files of a training run, beside metrics.jsonl (which stays the record).

Written with tensorboardX (a dependency of hnet-jax: pure Python, needs only protobuf and numpy)
whenever it is importable, by process 0 only, into RUN_DIR/tensorboard/
(RunDir.tensorboard); view them with `tensorboard --logdir RUN_DIR/tensorboard`. Every metrics
row becomes scalars at its step:

    train/loss, train/ce, train/bpb, train/ratio_loss, train/grad_norm, train/lr
    train/stage{s}_bytes_per_chunk, train/stage{s}_dropped_rate,
    train/stage{s}_slot_utilisation                                  per chunking stage
    speed/step_time_s, speed/bytes_per_sec, speed/tokens_per_sec (token runs),
    speed/model_flops_per_step, speed/mfu, speed/peak_memory_bytes   where the row has them
    eval/bpb, eval/stage{s}_bytes_per_chunk, eval/stage{s}_dropped_rate, eval/stage{s}_slot_utilisation

A resumed run marks its first new step as the purge step: TensorBoard then hides what the
interrupted run logged after the restored checkpoint, which the resumed run logs again.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

TRAIN_SCALARS = ("loss", "ce", "bpb", "ratio_loss", "grad_norm", "lr")
SPEED_SCALARS = ("step_time_s", "bytes_per_sec", "tokens_per_sec", "model_flops_per_step", "mfu", "peak_memory_bytes")
EVAL_SCALARS = ("bpb",)
STAGE_SUFFIXES = (
    "_bytes_per_chunk",
    "_dropped_rate",
    "_slot_utilisation",
)  # stage{s}<suffix>, in step and evaluation rows


def available() -> bool:
    """Whether tensorboardX is installed."""
    return importlib.util.find_spec("tensorboardX") is not None


def scalars(row: dict) -> dict[str, float]:
    """The TensorBoard scalars of a metrics row (a step row, or an evaluation row with "split"):
    tag -> value."""
    is_stage = lambda key: key.startswith("stage") and key.endswith(STAGE_SUFFIXES)
    if "split" in row:
        values = {k.removeprefix("eval_"): v for k, v in row.items() if k.startswith("eval_")}
        return {f"eval/{k}": float(v) for k, v in values.items() if k in EVAL_SCALARS or is_stage(k)}
    tags = {f"train/{k}": float(v) for k, v in row.items() if k in TRAIN_SCALARS or is_stage(k)}
    tags.update({f"speed/{k}": float(v) for k, v in row.items() if k in SPEED_SCALARS})
    return tags


class TensorBoardLog:
    """Metrics rows -> scalars in an event file under `log_dir`; does nothing when `log_dir` is
    None (another process than 0, or tensorboardX not installed).

    Events are written synchronously with tensorboardX's EventsWriter, flushed after each batch of
    rows, so that a write the disk refuses raises OSError here, in the training thread (tensorboardX's
    SummaryWriter writes from a thread of its own, which dies on such an error and leaves the run
    blocked on its queue).

    first_step: the first step this call logs; on resume it is the purge step (a session-start
    event there: TensorBoard hides the events of the earlier run from that step on). It also ends
    the event file's name, which otherwise holds only the time in whole seconds and the host, so
    that a resume within the same second does not overwrite the earlier file.
    """

    def __init__(self, log_dir: Path | None, first_step: int = 1):
        self._events = None
        if log_dir is not None:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._events = EventsWriter(str(Path(log_dir) / "events"), f".step{first_step}")
            if first_step > 1:
                self._events.write_event(
                    Event(wall_time=time.time(), step=first_step, session_log=SessionLog(status=SessionLog.START))
                )
            self._events.flush()

    def write(self, rows: list[dict]) -> None:
        """Scalars of metrics rows, then a flush."""
        if self._events is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for row in rows:
            for tag, value in scalars(row).items():
                self._events.write_event(Event(wall_time=time.time(), step=row["step"], summary=scalar(tag, value)))
        self._events.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._events is not None:
            self._events.close()
            self._events = None
