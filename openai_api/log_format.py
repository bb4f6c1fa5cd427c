"""The log formatter of settings.LOGGING (imported while logging is configured: stdlib only)."""
from __future__ import annotations

import logging
import time


class Formatter(logging.Formatter):
    """logging.Formatter, with %(asctime)s made once per second: time.localtime() and strftime()
    cost more than the rest of an access line (glibc checks the time zone file on every call),
    and a busy process writes hundreds of lines a second. The text is the same."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        if datefmt is not None or self.converter is not time.localtime:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self.default_time_format, time.localtime(record.created)))
        return self.default_msec_format % (cached[1], record.msecs) if self.default_msec_format else cached[1]
