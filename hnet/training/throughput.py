"""How fast training runs, shared by the training loop (metrics.jsonl, progress bar) and
`python -m hnet.perf.bench train`: model FLOPs of a step, MFU, and the devices' peak memory.

- Model FLOPs of a training step: hnet.flops.training_flops_per_step at the lengths the stages
  compute: an inner stage at seq_len / the bytes per chunk that step measured (its
  `stage{s}_bytes_per_chunk` metrics), at most its static capacity.
- MFU = model FLOPs / (seconds x devices x peak FLOP/s per device). The peak is the dense bf16
  peak of a known accelerator (`device_peak_flops`), or the one given (`--peak-tflops`); CPUs and
  unknown devices have none, and then MFU is left out.
- Peak memory: the largest `peak_bytes_in_use` that the devices' allocators report (GPU, TPU);
  None where the backend reports nothing (CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from hnet.chunking import stage_lengths as capacity_stage_lengths
from hnet.config import ModelConfig
from hnet.flops import stage_lengths as flops_stage_lengths
from hnet.flops import training_flops_per_step
from hnet.stage_metrics import stage_metric

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (H100 and H200 SXM). GPU kinds
# carry a suffix in jax's device_kind ("NVIDIA H100 80GB HBM3"), so they match by prefix; TPU
# kinds are matched exactly ("TPU v5 lite" is v5e, "TPU v5" is v5p).
GPU_PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}
TPU_PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12}


def device_peak_flops(device) -> float | None:
    """The dense bf16 peak FLOP/s of a known accelerator, None otherwise (CPU, unknown devices)."""
    kind = device.device_kind
    if kind in TPU_PEAK_FLOPS:
        return TPU_PEAK_FLOPS[kind]
    for prefix, flops in GPU_PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return flops
    return None


def peak_flops(device, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s per device for MFU: `peak_tflops` x 1e12 when given, else the known peak."""
    return peak_tflops * 1e12 if peak_tflops else device_peak_flops(device)


def measured_bytes_per_chunk(config: ModelConfig, metrics: dict) -> list[float]:
    """Per chunking stage, the bytes per chunk a step measured (its stage{s}_bytes_per_chunk)."""
    return [float(metrics[stage_metric(s, "bytes_per_chunk")]) for s in range(config.depth)]


def computed_stage_lengths(config, seq_len: int, bytes_per_chunk=None) -> list[float]:
    """Positions per sequence each stage computes, outermost first (depth + 1 numbers).

    An inner stage: seq_len / bytes_per_chunk[s] (measured, cumulative; None: the routing's
    target, N_s per learned stage, products for nested stages, hnet.flops.stage_lengths), capped
    by the static capacity hnet.chunking.stage_lengths(config, seq_len), since no stage computes
    more chunks than it has slots. Raises FlopsError for 'space' routing without a measurement.
    """
    real = flops_stage_lengths(config, seq_len, bytes_per_chunk)
    return [min(length, capacity) for length, capacity in zip(real, capacity_stage_lengths(config, seq_len))]


def model_flops_per_step(config, batch_size: int, seq_len: int, bytes_per_chunk=None) -> tuple[float, list[float]]:
    """-> (hnet.flops training FLOPs of one step at computed_stage_lengths, those lengths)."""
    lengths = computed_stage_lengths(config, seq_len, bytes_per_chunk)
    return training_flops_per_step(config, batch_size, seq_len, [seq_len / length for length in lengths[1:]]), lengths


def step_model_flops(config: ModelConfig, batch_size: int, seq_len: int, metrics: dict) -> float:
    """Model FLOPs of one training step of `batch_size` sequences of `seq_len` positions, at the
    bytes per chunk in the step's metrics (host values), at most the capacity."""
    return model_flops_per_step(config, batch_size, seq_len, measured_bytes_per_chunk(config, metrics))[0]


def mfu(model_flops: float, seconds: float, peak: float | None, device_count: int) -> float | None:
    """Model FLOPs utilisation of `model_flops` done in `seconds` on `device_count` devices."""
    return model_flops / (seconds * device_count * peak) if peak else None


def peak_memory_bytes(devices) -> int | None:
    """The largest peak_bytes_in_use among `devices`, None when none of them reports it."""
    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in devices]
    peaks = [int(p) for p in peaks if p is not None]
    return max(peaks) if peaks else None


@dataclass(frozen=True)
class TrainingSpeed:
    """The speed fields of the training loop's metrics rows, for one run.

    The loop pulls metrics to the host once per window of steps (every log_every steps, and
    before each evaluation and save) and times the window as a whole, so that timing adds no
    host synchronisation: every row of a window gets the window's step time, throughput and
    MFU, its own model FLOPs, and the peak memory so far.
    """

    config: ModelConfig
    batch_size: int  # global sequences per step
    seq_len: int  # positions per sequence (bytes, or tokens in a token run)
    peak_flops: float | None  # per device; None: MFU is left out
    devices: tuple  # every device of the run (MFU counts them all)
    local_devices: tuple  # this process's devices (peak memory)

    def annotate(self, rows: list[dict], window_bytes: int, seconds: float) -> None:
        """Add the speed fields to the rows of a window of len(rows) steps that covered
        `window_bytes` text bytes in `seconds` of wall time:

        step_time_s, bytes_per_sec, tokens_per_sec (token runs), model_flops_per_step (at the
        row's own bytes per chunk), mfu (when the peak is known), peak_memory_bytes (when reported).
        """
        seconds = max(seconds, 1e-9)
        shared = {"step_time_s": seconds / len(rows), "bytes_per_sec": window_bytes / seconds}
        if not self.config.is_byte_model:
            shared["tokens_per_sec"] = len(rows) * self.batch_size * self.seq_len / seconds
        flops = [step_model_flops(self.config, self.batch_size, self.seq_len, row) for row in rows]
        utilisation = mfu(sum(flops), seconds, self.peak_flops, len(self.devices))
        if utilisation is not None:
            shared["mfu"] = utilisation
        memory = peak_memory_bytes(self.local_devices)
        if memory is not None:
            shared["peak_memory_bytes"] = memory
        for row, step_flops in zip(rows, flops):
            row.update(shared, model_flops_per_step=step_flops)
