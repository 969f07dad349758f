"""Train an H-Net (or a Transformer baseline) from scratch.

    python train.py                                   # default tiny H-Net on the embedded corpus (CPU, minutes)
    python train.py --config configs/run_tiny.json --workdir runs/x --set train.lr=3e-4
    python train.py --workdir runs/x --resume         # continue from the newest checkpoint
    python train.py --plot runs/x                     # PNG curves of a run
    python train.py --workdir runs/x --profile 10:12  # jax.profiler trace of steps 10-12 in runs/x/profile
    python train.py --set mesh.fsdp=8                 # lay the run out over devices (hnet.parallel.sharding)
    python train.py --coordinator HOST:PORT --num-processes 2 --process-id 0 ...   # one of several hosts

Bad input (config, data, run folder, no usable checkpoint to resume) prints one line starting
with "error:" and exits 2. --resume skips a damaged or incomplete newest checkpoint (one warning
line each; see hnet/io/checkpoint.py) and continues from the newest good one.

The restart command `python train.py --workdir RUN_DIR --resume` works at every moment of a run:
before its first checkpoint it starts the run again from step 0, during a save it ignores the
partial one, after the last step it says the run is complete and exits 0. One job per run folder:
while a training job holds RUN_DIR/train.lock, another one on the folder exits 2 naming it
(hnet/training/run_lock.py). A write the disk refuses (no space, permission, quota) ends the run with one
"error:" line naming the file or checkpoint, and exit status 4; what was saved before is intact.
SIGTERM/SIGINT: the current step finishes, a checkpoint is saved, and the process exits 0.
In a multi-process run, a lost process makes the others print one "error:" line and exit 3
(hnet/parallel/distributed.py); restart all of them with --resume.
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

from hnet.training.run_config import add_override_argument


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--config", help="run config JSON (default: configs/run_tiny.json; with --resume: the run's own)"
    )
    parser.add_argument(
        "--workdir", help="run folder for config, metrics and checkpoints (default: runs/<config>-<time>)"
    )
    add_override_argument(parser, "train.lr=3e-4 or model.ssm_cfg.d_state=64 (any depth)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --workdir from its newest checkpoint"
    )
    parser.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps in this call")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)"
    )
    parser.add_argument("--plot", metavar="RUN_DIR", help="write PNG curves of RUN_DIR's metrics and exit")
    parser.add_argument(
        "--profile",
        metavar="START:STOP",
        help="trace steps START to STOP (1-based, both included) with jax.profiler into RUN_DIR/profile",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        metavar="TFLOPS",
        help="peak TFLOP/s per device for MFU (default: the known bf16 peak of GPUs and TPUs; "
        "without one, e.g. on CPU, MFU is not reported)",
    )
    cluster = parser.add_argument_group("multi-process runs (see hnet/parallel/distributed.py)")
    cluster.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0's coordinator (default: $JAX_COORDINATOR_ADDRESS)",
    )
    cluster.add_argument("--num-processes", type=int, help="number of processes (default: $JAX_NUM_PROCESSES)")
    cluster.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1 (default: $JAX_PROCESS_ID)")
    cluster.add_argument(
        "--distributed",
        action="store_true",
        help="let JAX detect the cluster (TPU pod slice, SLURM, Open MPI, Kubernetes)",
    )
    cluster.add_argument(
        "--distributed-timeout",
        type=int,
        default=300,
        metavar="SECONDS",
        help="how long to wait for the other processes (start-up, heartbeats, shutdown)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # A checkpoint write that fails leaves orbax's other fragment writes unawaited; Python would
    # print a RuntimeWarning for each at exit, after the one-line error that already says it all.
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    from hnet.errors import ConfigError, report
    from hnet.parallel import distributed

    if not args.plot:
        # Before anything touches a device (importing hnet.training.train_loop does): join the other
        # processes of a multi-process run.
        try:
            distributed.maybe_initialize(
                args.coordinator,
                args.num_processes,
                args.process_id,
                auto=args.distributed,
                timeout_s=args.distributed_timeout,
            )
        except ConfigError as err:
            return report(err)
    import jax

    from hnet.errors import WRITE_FAILED_EXIT, DataError, RunError, RunWriteError
    from hnet.io.run_dir import RunDir
    from hnet.stage_metrics import stage_values

    try:
        if args.plot:
            from hnet.evaluation.plot import plot_run

            for path in plot_run(args.plot):
                print(f"wrote {path}")
            return 0
        from hnet.training.profiling import ProfileSteps
        from hnet.training.run_config import load_run_config
        from hnet.training.train_loop import train

        if args.peak_tflops is not None and not args.peak_tflops > 0:
            raise ConfigError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
        profile = ProfileSteps.parse(args.profile) if args.profile else None
        if args.resume and not args.workdir:
            raise RunError("--resume needs --workdir RUN_DIR")
        run = None
        if args.config or not args.resume:
            run = load_run_config(args.config, args.overrides)
        elif args.overrides:  # --resume --set mesh.fsdp=2: the saved run, changed (e.g. onto other devices)
            saved = RunDir(args.workdir).config
            if not saved.is_file():
                raise RunError(f"--resume: {args.workdir} holds no run (no {saved.name})")
            run = load_run_config(saved, args.overrides)
        workdir = (
            Path(args.workdir)
            if args.workdir
            else Path("runs") / f"{Path(args.config or 'run_tiny').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        summary = train(
            run,
            workdir,
            resume=args.resume,
            progress=not args.no_progress,
            max_steps=args.max_steps,
            peak_tflops=args.peak_tflops,
            profile=profile,
        )
    except RunWriteError as err:  # the disk refused a write: a checkpoint, metrics
        return report(err, WRITE_FAILED_EXIT)
    except (ConfigError, DataError, RunError) as err:
        return report(err)
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() == 1:
            raise
        # Most often a collective whose other side died: one line, and no wait for it at exit.
        lines = str(err).strip().splitlines() or [type(err).__name__]
        distributed.exit_after_lost_process(f"a step failed ({lines[0][:200]})")
    if jax.process_index() != 0:  # process 0 reports for the run
        return 0
    result = summary["eval"]
    print(f"{summary['status']} at step {summary['step']} ({summary['bytes_seen']:,d} bytes seen)")
    if result:
        stages = "".join(
            f", stage {s} bytes/chunk {value:.2f}" for s, value in enumerate(stage_values(result, "bytes_per_chunk"))
        )
        print(f"validation bpb {result['bpb']:.4f}{stages}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics: {Path(summary['workdir']) / 'metrics.jsonl'}  (plot: python train.py --plot {summary['workdir']})")
    return 0


if __name__ == "__main__":
    from hnet.host_memory import use_huge_pages

    use_huge_pages()  # first thing: large allocations on huge pages, far fewer page faults per step
    sys.exit(main())
