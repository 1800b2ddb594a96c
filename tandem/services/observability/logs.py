"""Logging set-up shared by every stage: plain text, or one JSON object per line
(`--log-format json`) for log pipelines. `log_event` adds structured fields to a line."""

from __future__ import annotations

import json
import logging
import time

_FIELDS = "tandem_fields"


class JsonFormatter(logging.Formatter):
    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "stage": self.stage,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, _FIELDS, None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def setup_logging(log_format: str = "text", stage: str = "tandem") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(stage) if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def log_event(logger: logging.Logger, message: str, **fields) -> None:
    """One INFO line with structured fields (keys in JSON, key=value pairs in text)."""
    logger.info(message, extra={_FIELDS: fields})
