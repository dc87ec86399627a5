"""Find where a JSON object or array ends in text that arrives in pieces."""

from __future__ import annotations


class JsonExtentScanner:
    """Incremental bracket matcher for one JSON value starting with ``{`` or ``[``.

    Feed text from the value's first character on; ``feed`` returns how many characters of
    that piece complete the value (so the value is everything fed up to there), or None while
    it is still open. It tracks strings and escapes but does not validate: the caller parses
    the extent with ``json.loads`` and treats a failure as malformed.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, piece: str) -> int | None:
        for char_idx, char in enumerate(piece):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return char_idx + 1
        return None
