"""Photo → Monet: the DVC stages (python -m pipeline.<stage>) and the modules beneath them."""
import os
import signal
import sys


def _stage_run_as_module() -> str | None:
    """'train' for `python -m pipeline.train ...`, else None (imported by a test, a notebook, MLflow)."""
    argv = getattr(sys, "orig_argv", [])
    module = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m"), "")
    return module.removeprefix("pipeline.") if module.startswith("pipeline.") else None


def _stopped_while_starting(signum, frame):
    # Ctrl-C or SIGTERM in the seconds a stage spends importing torch: one line, not the import's
    # traceback (nor, for SIGTERM, nothing at all); errors.cli takes over once the stage runs. A DDP
    # worker says nothing: its launcher says it once
    if "WORLD_SIZE" not in os.environ:
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"error: {_stage_run_as_module()}: {how} while starting; nothing was written", file=sys.stderr)
    sys.exit(128 + signum)


# only where the signal would stop the stage: a shell's background job ignores Ctrl-C, and keeps
# doing so; a torchrun worker keeps SIGTERM's default (its launcher stops it so, and reports)
if _stage_run_as_module():
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stopped_while_starting)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and "WORLD_SIZE" not in os.environ:
        signal.signal(signal.SIGTERM, _stopped_while_starting)
