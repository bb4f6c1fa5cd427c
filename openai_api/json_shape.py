"""Structural limits on a JSON body, checked on its bytes before it is parsed.

Parsing is where a hostile body costs most: orjson turns 16 MB of `[],[],...` into 5 million
lists (over a second of CPU and about 600 MB), and nothing a client may send needs more than
a few levels of nesting. Both are refused here with passes over the bytes that run at C speed:
a usual request costs a few `bytes.count` calls, and only a body with many brackets or commas
gets the exact check, which looks at the structure outside strings (linear, no Python loop per
character or per value).
"""
from __future__ import annotations

from openai_api.errors import InvalidRequestError

# bytes.translate tables: keep only brackets, and make every bracket a square one.
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_SQUARE = bytes.maketrans(b"{}", b"[]")


def check_json_shape(raw: bytes, max_depth: int, max_values: int) -> None:
    """Raise InvalidRequestError if `raw` nests deeper than `max_depth` or holds more than
    about `max_values` values (array elements and object members). Malformed JSON is left
    for the parser to report."""
    opens = raw.count(b"[") + raw.count(b"{")
    if opens <= max_depth and (len(raw) < max_values or raw.count(b",") + opens < max_values):
        return  # every usual request ends here
    outside = structure(raw, max_values)
    brackets = outside.translate(_SQUARE, _NOT_BRACKETS)
    # Opening brackets in a row (outside strings, closers removed) each nest in the previous.
    if b"[" * (max_depth + 1) in brackets:
        raise too_deep(max_depth)
    if outside.count(b",") + len(brackets) // 2 > max_values:
        raise too_many_values(max_values)
    if len(brackets) // 2 > max_depth and deeper_than(brackets, max_depth):
        raise too_deep(max_depth)


def structure(raw: bytes, max_values: int) -> bytes:
    """`raw` without the contents of its strings (the quotes stay), so that brackets and
    commas inside strings are not counted."""
    if b"\\" in raw:  # escapes only occur inside strings: drop them, and with them every \"
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    # At most two strings per value (an object member's name and value); checked first so
    # that the split below makes a bounded number of pieces.
    if raw.count(b'"') > 4 * (max_values + 1):
        raise too_many_values(max_values)
    return b"".join(raw.split(b'"')[::2])


def deeper_than(brackets: bytes, depth: int) -> bool:
    """Whether a string of square brackets nests deeper than `depth`: each pass removes the
    innermost pairs, so a structure `depth` deep is gone after `depth` passes. An unbalanced
    string stops shrinking; it is malformed JSON, which the parser reports."""
    for _ in range(depth):
        shorter = brackets.replace(b"[]", b"")
        if not shorter or len(shorter) == len(brackets):
            return False
        brackets = shorter
    return True


def too_deep(max_depth: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"The JSON body is nested more than {max_depth} levels deep.", code="json_too_deep",
    )


def too_many_values(max_values: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"The JSON body has more than {max_values} values (array elements and object members).",
        code="json_too_large",
    )
