"""Log output: `text` (one human-readable line per record) or `json` (one JSON object per line, for log
collectors such as Loki, Elasticsearch or CloudWatch). uvicorn's own records go through the same handler,
and so do Python warnings (torch's, Pillow's, ours): printed raw, they would be the lines a collector of
JSON logs cannot parse.

Request lines carry their fields as record attributes (`extra=`), so the JSON form has them as keys
(`request_id`, `method`, `route`, `status`, `ms`) instead of inside the message. So do the lines about
one request's failure (an unhandled error, a model fault, a server refusal): `request_id`, the id the
client got in X-Request-ID and the error body, finds them as it finds the request line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has: anything else on a record was passed in `extra=` and is a field.
# uvicorn adds `color_message`: the message again, with terminal colour codes.
_SKIPPED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    converter = staticmethod(time.gmtime)  # the "Z" below: UTC, whatever the host's zone

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _SKIPPED and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str, fmt: LogFormat) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # A warning becomes one WARNING record of the `py.warnings` logger (its text, source line included, is
    # the message), instead of text written straight to stderr. The filters still decide what is shown.
    logging.captureWarnings(True)
    # At debug Pillow logs every PNG chunk it reads: several lines per upload, none about the service.
    logging.getLogger("PIL").setLevel(max(logging.INFO, logging.getLogger().level))
