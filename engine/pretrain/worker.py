"""The process ``torchrun`` starts on every rank: ``python -m engine.pretrain.worker --config FILE``.

Reads the frozen config written by ``blissctl pretrain`` and runs ``engine.pretrain.train.train``. A
``UserError`` becomes one line on stderr (from rank 0) and exit status 2; Ctrl-C (forwarded by
torchrun) exits 130, keeping the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

ONE_LINE_ERROR = "error: "
ONE_LINE_INTERRUPT = "interrupted: "
"""How a trainer's one-line messages start: the launcher recognises them and then hides torchrun's own
report of the failure (a traceback of torchrun itself) that follows."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.pretrain.worker", description=__doc__)
    parser.add_argument("--config", required=True, help="pretrain_config.json written by blissctl pretrain")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this many steps")
    args = parser.parse_args(argv)

    from engine.errors import UserError, describe_machine_error, is_machine_error
    from engine.pretrain.launch import read_frozen_config
    from engine.pretrain.train import train
    from engine.runtime import die_with_parent, reuse_freed_memory, start_runtime, stop_runtime

    die_with_parent()  # torchrun killed (its launcher was): no trainer goes on writing the run
    reuse_freed_memory()  # no page faults on the tensors each step frees and allocates again
    rank = int(os.environ.get("RANK", 0))
    runtime = None
    try:
        config = read_frozen_config(args.config)
        runtime = start_runtime(config.device)
        train(config, resume=args.resume, stop_after=args.stop_after, runtime=runtime)
    except UserError as error:
        if rank == 0:
            print(f"{ONE_LINE_ERROR}{error}", file=sys.stderr, flush=True)
        return 2
    except OSError as error:
        if not is_machine_error(error):
            raise
        if rank == 0:
            print(f"{ONE_LINE_ERROR}{describe_machine_error(error)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if rank == 0:
            print(f"{ONE_LINE_INTERRUPT}the last checkpoint is kept; run again with --resume", file=sys.stderr,
                  flush=True)
        return 130
    finally:
        if runtime is not None:
            stop_runtime(runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
