"""Cells for CSV exports that spreadsheets open as text, never as formulas (CSV injection).

Any key holder chooses the `model` string stored in its usage rows; a cell such as
`=HYPERLINK("http://x","y")` would run as a formula in the spreadsheet of whoever opens the
export. OWASP's rule: a text cell that begins with =, +, -, @, a tab or a carriage return gets
a leading single quote. Numbers (and text that is just a number, such as -1) stay as they are.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
PLAIN_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def safe_cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not PLAIN_NUMBER.match(value):
        return "'" + value
    return value


def safe_row(row: Iterable[Any]) -> list[Any]:
    return [safe_cell(value) for value in row]
