"""Log output of the service (service.logs): what a log collector reads on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A library warning after start-up (torch, Pillow, our own warnings.warn), in a fresh interpreter: the
# test runner's own warning capture would otherwise swallow it.
_WARN_AFTER_CONFIG = """
import sys, warnings
from service.logs import configure_logging
configure_logging("info", sys.argv[1])
warnings.warn("careful: something is deprecated", UserWarning)
"""


def _stderr_of_a_warning(fmt: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _WARN_AFTER_CONFIG, fmt],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stderr


def test_a_python_warning_is_one_json_record_under_json_logs() -> None:
    lines = _stderr_of_a_warning("json").strip().splitlines()
    (record,) = [json.loads(line) for line in lines]  # raw warning text would not parse
    assert record["level"] == "WARNING" and record["logger"] == "py.warnings"
    assert "UserWarning: careful: something is deprecated" in record["message"]
    assert record["time"].endswith("Z")


def test_a_python_warning_has_the_text_format_too() -> None:
    first = _stderr_of_a_warning("text").splitlines()[0]
    # "<date> <time> WARNING py.warnings: <file>:<line>: UserWarning: …", like every other record
    assert " WARNING py.warnings: " in first and "UserWarning: careful" in first
