"""What the two commands (`python -m trainer`, `python -m trainer.evaluate`) share: help formatting and
log output."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from tqdm import tqdm


def refuse_empty_paths(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """ValueError naming the first of the path flags `names` given as an empty string. Path('') is the
    current directory, and a run, its data or a cache silently landing there is never what an empty
    variable in a script (`--data "$PHOTOS"`) meant."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value.strip():
            raise ValueError(f"--{name.replace('_', '-')} must not be empty")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type` for an integer flag of `low` or more: a value below is refused the way argparse
    refuses a non-number (usage line, the flag named, exit 2), before any work is done."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


# Both commands decode with the same loader and say the same about it: 1 is "in this process"; 0 meant
# nothing more (the loader only starts a pool above 1) and was accepted by one command, refused by the other.
WORKERS_HELP = (
    "processes decoding images (1: decode in this process, no pool; default: the CPU count, at most 8)"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every optional flag, unless its help already states a computed default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default:" in text or action.required:
            return text
        return super()._get_help_string(action)


def duration(seconds: float) -> str:
    """A measured time for a log line: seconds up to a minute, minutes beyond. "0.0 min" for a short run
    read as "nothing happened"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def bar_interval() -> float:
    """Seconds between a progress bar's redraws: smooth on a terminal; in a log file (Docker, CI) every
    redraw is a line, so rarely there."""
    return 0.1 if sys.stderr.isatty() else 30.0


class _TqdmHandler(logging.Handler):
    """Log lines printed through tqdm so they never tear an active progress bar."""

    def __init__(self, stream_name: str) -> None:
        super().__init__()
        self.stream_name = stream_name

    def emit(self, record: logging.LogRecord) -> None:
        stream = getattr(sys, self.stream_name)  # looked up per line: tests swap sys.stdout
        text = self.format(record)
        try:
            tqdm.write(text, file=stream)
        except UnicodeEncodeError:
            # A path that is not valid UTF-8 (a folder unzipped from an old camera or Windows archive) holds
            # surrogates; a strict stdout (any UTF-8 locale but C.UTF-8) raised here, and a log line ended
            # the run. Such bytes are printed as escapes instead.
            encoding = getattr(stream, "encoding", None) or "utf-8"
            tqdm.write(text.encode(encoding, "backslashreplace").decode(encoding), file=stream)
        stream.flush()


def setup_logging(stream_name: str = "stdout") -> None:
    """The "trainer" logger prints plain lines; under torchrun only rank 0 narrates, the other ranks
    speak up for warnings and errors."""
    log = logging.getLogger("trainer")
    for h in [h for h in log.handlers if isinstance(h, _TqdmHandler)]:
        log.removeHandler(h)
    handler = _TqdmHandler(stream_name)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
