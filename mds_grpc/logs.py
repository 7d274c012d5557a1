"""Structured JSON log lines to stdout and to a rotating file under the log folder."""

import asyncio
import json
import logging
import logging.handlers
import sys
import time
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from pathlib import Path

from pythonjsonlogger.json import JsonFormatter

ACCESS_FLUSH_SECONDS = 0.1
ACCESS_BATCH_LINES = 512
# One write to a pipe stays whole up to PIPE_BUF (4 KiB on Linux): `mds serve --processes N` has
# its serving processes share stdout, so each record of lines is kept under it.
ACCESS_RECORD_BYTES = 4000


class _Formatter(JsonFormatter):
    """JSON lines; a record marked `preformatted` already holds finished lines."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if getattr(record, "preformatted", False) else super().format(record)


def configure_logging(log_dir: Path, level: str = "INFO", file_name: str = "mds.log") -> None:
    formatter = _Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [
        logging.StreamHandler(sys.stdout),
        logging.handlers.RotatingFileHandler(log_dir / file_name, maxBytes=50 * 2**20, backupCount=5),
    ]
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())


# json.dumps(default=str)'s C encoder, made once (json.dumps makes one per call); no circular check, which
# flat fields never need.
_C_JSON = c_make_encoder and c_make_encoder(None, str, encode_basestring_ascii, None, ": ", ", ", False, False, True)
_JSON = json.JSONEncoder(default=str)


def _json(fields: dict) -> str:
    return "".join(_C_JSON(fields, 0)) if _C_JSON else _JSON.encode(fields)


_second: list = [None, ""]  # the last whole second formatted, and its text


def _log_time(seconds: float) -> str:
    """The `time` field as logging's asctime writes it: 2026-11-27 11:03:00,321."""
    whole = int(seconds)
    if _second[0] != whole:
        _second[:] = whole, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    return f"{_second[1]},{int(seconds % 1 * 1000):03d}"


class AccessLog:
    """One JSON line per RPC, handed to `logging` in batches (at least every 0.1 s).

    Formatting and writing each line through `logging` costs more than a small model's run; a
    batch goes out as few records (each under ACCESS_RECORD_BYTES), so few formats and writes.
    Call flush() before exiting.
    """

    def __init__(self) -> None:
        self.logger = logging.getLogger("mds.access")
        self._pending: list[tuple[float, dict]] = []
        self._timer: asyncio.TimerHandle | None = None

    def write(self, fields: dict) -> None:
        self._pending.append((time.time(), fields))
        if len(self._pending) >= ACCESS_BATCH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(ACCESS_FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not (batch and self.logger.isEnabledFor(logging.INFO)):
            return
        record: list[str] = []
        size = 0
        for t, fields in batch:
            line = _json(
                {"time": _log_time(t), "level": "INFO", "logger": self.logger.name, "message": "rpc", **fields}
            )
            if record and size + len(line) >= ACCESS_RECORD_BYTES:
                self.logger.info("\n".join(record), extra={"preformatted": True})
                record, size = [], 0
            record.append(line)
            size += len(line) + 1
        self.logger.info("\n".join(record), extra={"preformatted": True})
