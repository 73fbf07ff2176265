"""Framed messages between the sandboxed program and its checker process, and a type-tagged
encoding of plain Python values for calls across them.

Frame: 4-byte big-endian length, then that many bytes of JSON. The checker reads at most
`MAX_FRAME` bytes per frame; anything longer, truncated or not valid is a protocol error (a
failed sample), never an exception that escapes the checker.

Values: None, bool, int, float, complex, str, bytes, list, tuple, set, frozenset and dict of
those (ints/floats also from numbers.Integral/Real, e.g. numpy scalars) cross exactly, keeping
their type (a tuple is not a list, True is not 1) so `==` in the tests means what it means in
one process. Anything else (a generator, a numpy array, a custom object) raises TypeError on
the sending side: the sample fails, as most such returns would under `==` anyway.
Decoding builds only these plain types; it never imports, calls or evaluates anything.

Imported by `_child.py` by path: no flylora imports here.
"""
import json
import numbers
import os
import struct

MAX_FRAME = 1 << 20
_TAGS = {list: "l", tuple: "t", set: "S", frozenset: "F"}


def encode(x):
    if x is None:
        return ["n"]
    if isinstance(x, bool):
        return ["b", x]
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return ["i", str(int(x))]
    if isinstance(x, numbers.Real):
        return ["f", repr(float(x))]
    if isinstance(x, complex):
        return ["c", repr(x.real), repr(x.imag)]
    if isinstance(x, str):
        return ["s", str(x)]
    if isinstance(x, (bytes, bytearray)):
        return ["y", bytes(x).hex()]
    for kind, tag in _TAGS.items():
        if isinstance(x, kind):
            return [tag, [encode(v) for v in x]]
    if isinstance(x, dict):
        return ["d", [[encode(k), encode(v)] for k, v in x.items()]]
    raise TypeError(f"cannot pass a {type(x).__name__} across the sandbox "
                    "(plain values only: numbers, str, bytes, None and list/tuple/set/dict of them)")


def decode(v):
    if not isinstance(v, list) or not v or not isinstance(v[0], str):
        raise ValueError("malformed value")
    tag, rest = v[0], v[1:]
    if tag == "n" and not rest:
        return None
    if tag == "b" and len(rest) == 1 and isinstance(rest[0], bool):
        return rest[0]
    if tag == "i" and len(rest) == 1 and isinstance(rest[0], str):
        return int(rest[0])
    if tag == "f" and len(rest) == 1 and isinstance(rest[0], str):
        return float(rest[0])
    if tag == "c" and len(rest) == 2 and all(isinstance(r, str) for r in rest):
        return complex(float(rest[0]), float(rest[1]))
    if tag == "s" and len(rest) == 1 and isinstance(rest[0], str):
        return rest[0]
    if tag == "y" and len(rest) == 1 and isinstance(rest[0], str):
        return bytes.fromhex(rest[0])
    if len(rest) == 1 and isinstance(rest[0], list):
        items = rest[0]
        if tag == "d":
            if not all(isinstance(p, list) and len(p) == 2 for p in items):
                raise ValueError("malformed dict")
            return {decode(k): decode(val) for k, val in items}
        for kind, t in _TAGS.items():
            if tag == t:
                return kind(decode(i) for i in items)
    raise ValueError(f"malformed value with tag {tag[:10]!r}")


def send(fd, message):
    data = json.dumps(message, separators=(",", ":")).encode()
    data = struct.pack(">I", len(data)) + data
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(fd, max_bytes=MAX_FRAME):
    """One message; EOFError when the peer is gone, ValueError for an oversized/garbled frame."""
    (n,) = struct.unpack(">I", _read_exactly(fd, 4))
    if n > max_bytes:
        raise ValueError(f"message of {n} bytes exceeds the {max_bytes}-byte limit")
    try:
        message = json.loads(_read_exactly(fd, n))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"garbled message ({type(e).__name__})") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ValueError("garbled message (not a tagged list)")
    return message
