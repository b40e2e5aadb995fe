"""Stopping a run on SIGTERM (schedulers) or SIGINT (Ctrl-C) so that it can be resumed exactly.

While train() runs, :class:`StopSignals` turns either signal into :class:`Interrupted`: during
fit at the start of the next training or validation batch (cast.app.callbacks.StopOnSignal;
weights, optimizer and data position then agree, and last.ckpt is written from them), elsewhere
at once. During fit Lightning's own SIGTERM handler may get there first with SIGTERMException at
the end of the batch, which train() records the same way. train() records
``status: interrupted`` with the signal, the step and the resume command in results.json, and the
entry point prints that command and exits with 128 + the signal number (SIGTERM 143, SIGINT 130),
the shell's convention, so a scheduler sees that the job did not finish.

A signal that already has a handler of its own (submitit installs one for SIGTERM in a SLURM
job, and handles the time limit with SIGUSR2: it requeues the job and exits) is left to it, but
noted on the way (``handed_over``): when the run then ends by an exception, train() records it as
``interrupted`` by that signal, not as failed, and lets the exception go on (submitit's exit).
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Signals that a job manager may own and act on (submitit: the SLURM time limit).
OWNED = (signal.SIGTERM, signal.SIGUSR2) if hasattr(signal, "SIGUSR2") else (signal.SIGTERM,)


class Interrupted(BaseException):
    """A stop asked for by a signal; a BaseException like KeyboardInterrupt, so that no
    ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Holds the SIGTERM/SIGINT handlers while a run lasts. During fit (``fitting``, set by
    cast.app.callbacks.StopOnSignal) a handler only notes the signal and the callback raises at
    the next batch; elsewhere, or at a second signal, the handler raises at once."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self.handed_over: signal.Signals | None = None   # a signal whose own handler ran
        self.fitting = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                current = signal.getsignal(signum)
                if current in (signal.SIG_DFL, signal.default_int_handler):
                    self._previous[signum] = current
                    signal.signal(signum, self._on_signal)
            for signum in OWNED:
                current = signal.getsignal(signum)
                if callable(current) and signum not in self._previous:
                    self._previous[signum] = current
                    signal.signal(signum, self._hand_over(current))
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        again = self.received is not None  # a second Ctrl-C does not wait for the batch to end
        self.received = signal.Signals(signum)
        if again or not self.fitting:
            raise Interrupted(signum)

    def _hand_over(self, handler):
        def noted(signum, frame):
            self.handed_over = signal.Signals(signum)
            return handler(signum, frame)

        return noted

    def stop_if_asked(self) -> None:
        if self.received is not None:
            raise Interrupted(self.received)


def resume_command(overrides: list[str], run_dir: str | Path) -> str:
    """The command that continues this run in its own directory from checkpoints/last.ckpt."""
    script = sys.argv[0] if sys.argv else ""
    if Path(script).name == "cast-train":
        program = "cast-train"
    else:  # in-process callers (tests, notebooks) get the repository's entry point
        program = f"python {script if script.endswith('train.py') else 'train.py'}"
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir")]
    return " ".join([program, *map(shlex.quote, kept), shlex.quote(f"hydra.run.dir={run_dir}"), "ckpt_path=last"])
