"""Photo → Monet: the DVC stages (python -m pipeline.<stage>) and the modules beneath them."""
import signal
import sys


def _stage_run_as_module() -> str | None:
    """'train' for `python -m pipeline.train ...`, else None (imported by a test, a notebook, MLflow)."""
    argv = getattr(sys, "orig_argv", [])
    module = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-m"), "")
    return module.removeprefix("pipeline.") if module.startswith("pipeline.") else None


def _interrupted_while_starting(signum, frame):
    # Ctrl-C in the seconds a stage spends importing torch: one line, not the import's traceback;
    # errors.cli takes over once the stage runs
    print(f"error: {_stage_run_as_module()}: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


# only where Ctrl-C would raise KeyboardInterrupt: a shell's background job ignores it, and keeps doing so
if _stage_run_as_module() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
