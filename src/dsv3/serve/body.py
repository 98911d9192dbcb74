"""Request bodies as JSON, parsed so that no input can crash the server or hold the GIL for long.

:func:`load_json` turns the bytes of a body into Python values or raises :class:`BodyError` with a
message for a 400. It refuses what ``json.loads`` lets through but the rest of the server could not
handle:

* nesting deeper than :data:`MAX_DEPTH` (``json.loads`` itself raises ``RecursionError`` near
  1,000 levels; anything deeper than a few dozen is never a real request),
* lone UTF-16 surrogates (``"\\ud800"``): valid JSON escapes, but not text; the tokenizer, the
  schema compiler and UTF-8 output can't represent them,
* ``NaN``, ``Infinity`` and numbers that overflow to them (``1e999``): not JSON at all,
* integers longer than Python's int-string limit (4,300 digits), which ``json.loads`` reports as a
  bare ``ValueError``.

Why a scanner of our own: the C decoder parses a whole document in one call without releasing the
GIL, so a 4 MB body of 60,000 small messages froze the event loop (and every stream) for a quarter
of a second. Here the top :data:`PY_LEVELS` levels of containers are walked in Python, and each
value below them goes to the C decoder on its own; the interpreter can switch threads between
those calls, so parsing in a worker thread no longer stalls the loop. Values are the same as
``json.loads`` gives (the tests compare them).
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import math
from typing import Any

# Containers nested deeper than this are refused (a chat request needs about 6 levels, a JSON schema
# a dozen or two).
MAX_DEPTH = 64
# Levels parsed in Python (so that the GIL is released between elements); deeper values are parsed
# by the C decoder in one call each.
PY_LEVELS = 2
# Bodies up to this size go to the C decoder whole: it holds the GIL for about 10 ms at most there,
# and the Python levels would cost 5-10x more time.
C_PARSE_BYTES = 256 * 1024


class BodyError(ValueError):
    """The body is not JSON the server accepts; the message says where and why."""


class _Scanner:
    """``scan_once(string, idx) -> (value, end)`` for the json module's parse functions: Python for the
    top levels, the C scanner below them."""

    def __init__(self) -> None:
        # NaN and Infinity parse to floats here and are refused by check_values, which knows their path.
        decoder = json.JSONDecoder()
        self.strict = decoder.strict
        self.memo: dict = {}
        self.c_scan = (json.scanner.c_make_scanner or json.scanner.py_make_scanner)(decoder)
        self.level = 0

    def __call__(self, s: str, idx: int) -> tuple[Any, int]:
        if self.level >= PY_LEVELS:
            return self.c_scan(s, idx)
        try:
            ch = s[idx]
        except IndexError:
            raise StopIteration(idx) from None
        if ch == "{":
            self.level += 1
            try:
                return json.decoder.JSONObject((s, idx + 1), self.strict, self, None, None, self.memo)
            finally:
                self.level -= 1
        if ch == "[":
            self.level += 1
            try:
                return json.decoder.JSONArray((s, idx + 1), self)
            finally:
                self.level -= 1
        return self.c_scan(s, idx)


def load_json(raw: bytes | str) -> Any:
    """Parse a request body (UTF-8 bytes) with all the checks of the module docstring."""
    value = parse_json(raw)
    check_values(value)
    return value


def parse_json(raw: bytes | str) -> Any:
    """Parse a body without :func:`check_values` (for callers that check sizes in between)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as e:
        raise BodyError(f"the request body is not valid UTF-8: {e}") from None
    idx = json.decoder.WHITESPACE.match(text, 0).end()
    scan = _Scanner()
    if len(text) <= C_PARSE_BYTES:
        scan.level = PY_LEVELS
    try:
        value, end = scan(text, idx)
    except StopIteration as e:
        raise BodyError(f"the request body is not valid JSON: expecting a value at character {e.value}") from None
    except json.JSONDecodeError as e:
        raise BodyError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BodyError(f"the request body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except BodyError:
        raise
    except ValueError as e:      # e.g. an integer with more digits than int() converts
        raise BodyError(f"the request body holds a number the server can't read: {e}") from None
    end = json.decoder.WHITESPACE.match(text, end).end()
    if end != len(text):
        raise BodyError(f"the request body is not valid JSON: extra data at character {end}")
    return value


def _where(path: tuple) -> str:
    out = ""
    if len(path) > 8:
        path = path[:4] + ("...",) + path[-3:]
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _bad_scalar(value: Any) -> str | None:
    """Why a scalar can't be accepted, or None."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "holds a lone UTF-16 surrogate (not valid Unicode text)"
    elif isinstance(value, float) and not math.isfinite(value):
        return "is not a finite number"
    return None


_PLAIN = frozenset({int, bool, type(None)})
_CONTAINERS = (dict, list)


def _scalars_ok(values: list) -> bool:
    """True if no scalar among ``values`` needs a closer look (C-speed checks on the whole list)."""
    types = set(map(type, values))
    if types <= _PLAIN:
        return True
    if str in types:
        text = "".join(v for v in values if type(v) is str)
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return False
    if float in types and not math.isfinite(sum(v for v in values if type(v) is float)):
        return False          # a NaN or an infinity (or finite values whose sum overflows: looked at one by one)
    return True


def check_values(value: Any) -> None:
    """Depth, surrogates and non-finite floats of a parsed body, walked without recursion.

    Each container's scalars are checked together first (set of types, one joined string, one sum);
    only a container that fails that is walked item by item to name the culprit.
    """
    if not isinstance(value, _CONTAINERS):
        if why := _bad_scalar(value):
            raise BodyError(f"the request body {why}")
        return
    stack: list[tuple[Any, int, tuple]] = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise BodyError(f"{_where(path)}: nested too deeply (at most {MAX_DEPTH} levels)")
        values = list(node.values()) if isinstance(node, dict) else node
        if isinstance(node, dict) and not _scalars_ok(list(node)):
            bad = next(k for k in node if _bad_scalar(k))
            raise BodyError(f"{_where(path)}: a key {_bad_scalar(bad)}")
        if not _scalars_ok(values):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, item in items:
                if not isinstance(item, _CONTAINERS) and (why := _bad_scalar(item)):
                    raise BodyError(f"{_where(path + (key,))} {why}")
        if isinstance(node, dict):
            stack.extend((v, depth + 1, path + (k,)) for k, v in node.items() if isinstance(v, _CONTAINERS) and v)
        else:
            stack.extend((v, depth + 1, path + (i,)) for i, v in enumerate(node) if isinstance(v, _CONTAINERS) and v)


def json_size_at_most(value: Any, limit: int) -> int | None:
    """About the size of ``value`` as compact JSON (strings counted by characters), or ``None`` as soon
    as it exceeds ``limit``; cheap for any value, however big (it stops early)."""
    size = 0
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            size += 2 + len(node)
            for k, v in node.items():
                size += len(k) + 3
                stack.append(v)
        elif isinstance(node, list):
            size += 2 + len(node)
            stack.extend(node)
        elif isinstance(node, str):
            size += len(node) + 2
        else:
            size += len(repr(node))
        if size > limit:
            return None
    return size
