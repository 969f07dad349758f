"""Train an H-Net (or a Transformer baseline) from scratch.

    python train.py                                   # default tiny H-Net on the embedded corpus (CPU, minutes)
    python train.py --config configs/run_tiny.json --workdir runs/x --set train.lr=3e-4
    python train.py --workdir runs/x --resume         # continue from the newest checkpoint
    python train.py --plot runs/x                     # PNG curves of a run

Bad input (config, data, run folder) prints one line starting with "error:" and exits 2.
SIGTERM/SIGINT: the current step finishes, a checkpoint is saved, and the process exits 0.
"""

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", help="run config JSON (default: configs/run_tiny.json; with --resume: the run's own)")
    parser.add_argument("--workdir", help="run folder for config, metrics and checkpoints (default: runs/<config>-<time>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a run-config value, e.g. train.lr=3e-4 or model.dtype=float32 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --workdir from its newest checkpoint")
    parser.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after this many steps in this call")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    parser.add_argument("--plot", metavar="RUN_DIR", help="write PNG curves of RUN_DIR's metrics and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hnet.config import ConfigError
    from hnet.data import DataError
    from hnet.train_loop import RunError

    try:
        if args.plot:
            from hnet.plot import plot_run

            for path in plot_run(args.plot):
                print(f"wrote {path}")
            return 0
        from hnet.run_config import load_run_config
        from hnet.train_loop import train

        if args.resume and not args.workdir:
            raise RunError("--resume needs --workdir RUN_DIR")
        run = None
        if args.config or args.overrides or not args.resume:
            run = load_run_config(args.config, args.overrides)
        workdir = Path(args.workdir) if args.workdir else Path("runs") / f"{Path(args.config or 'run_tiny').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        summary = train(run, workdir, resume=args.resume, progress=not args.no_progress, max_steps=args.max_steps)
    except (ConfigError, DataError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = summary["eval"]
    print(f"{summary['status']} at step {summary['step']} ({summary['bytes_seen']:,d} bytes seen)")
    if result:
        stages = "".join(f", stage {s} bytes/chunk {result[f'stage{s}_bytes_per_chunk']:.2f}"
                         for s in range(8) if f"stage{s}_bytes_per_chunk" in result)
        print(f"validation bpb {result['bpb']:.4f}{stages}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics: {Path(summary['workdir']) / 'metrics.jsonl'}  (plot: python train.py --plot {summary['workdir']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
