"""Incremental detokenization and stop-string matching for one request.

Text is released to the client only when it can no longer change: a token sequence that ends
inside a multi-byte character is held back, and so are the last ``len(longest stop) - 1``
characters, which might still turn out to begin a stop string.
"""

from __future__ import annotations

from typing import Any, Protocol

from tokenizers.decoders import DecodeStream

# Prompt tokens decoded before the output, so tokenizers that drop a leading space at the
# start of a decode (SentencePiece) still produce it.
_PROMPT_CONTEXT_TOKENS = 4


class Detokenizer(Protocol):
    def append(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        ...


def new_detokenizer(tokenizer: Any, prompt_token_ids: list[int]) -> Detokenizer:
    """The incremental detokenizer for ``tokenizer``: the Rust ``DecodeStream`` for a plain
    ``transformers`` fast tokenizer (``decode`` not overridden, no clean-up; same text as
    ``tokenizer.decode(ids, skip_special_tokens=True)``, measured 1.6 vs 2.6 us per token
    against decoding windows twice), the generic ``OffsetDetokenizer`` otherwise."""
    from transformers import PreTrainedTokenizerFast

    backend: Any = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer
    plain = (
        backend is not None
        and type(tokenizer).decode is PreTrainedTokenizerFast.decode
        and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
        and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
    )
    if plain:
        return StreamDetokenizer(backend, prompt_token_ids)
    return OffsetDetokenizer(tokenizer, prompt_token_ids)


class StreamDetokenizer:
    """``tokenizers.decoders.DecodeStream`` primed with the prompt's last tokens."""

    def __init__(self, backend: Any, prompt_token_ids: list[int]) -> None:
        self.backend = backend
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.stream = DecodeStream(ids=context, skip_special_tokens=True)

    def append(self, token_id: int) -> str:
        return self.stream.step(self.backend, token_id) or ""


class OffsetDetokenizer:
    """Any tokenizer with ``decode``: decode a sliding window twice per token and release
    what changed (the approach of vLLM / TGI)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.token_ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def append(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        prefix_text = self.decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self.decode(self.token_ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence, or a token with no visible text
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]


class TextOutput:
    """The generated text of one request, with stop strings applied.

    ``add`` returns the newly releasable text; ``stopped_by`` names the stop string that
    ended generation, if any (the text is then cut before it, or after it when
    ``include_stop_str``).
    """

    def __init__(self, stop: list[str], include_stop_str: bool) -> None:
        self.stop = stop
        self.include_stop_str = include_stop_str
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.num_released = 0
        self.stopped_by: str | None = None

    def add(self, delta: str) -> str:
        search_from = max(0, len(self.text) - self.holdback)
        self.text += delta
        if self.stop:
            self._apply_stop_strings(search_from)
        release_to = len(self.text) if self.stopped_by else len(self.text) - self.holdback
        return self._release(release_to)

    def flush(self) -> str:
        """Release everything held back (call when the request finishes)."""
        return self._release(len(self.text))

    def _apply_stop_strings(self, search_from: int) -> None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            idx = self.text.find(stop, search_from)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is not None:
            idx, stop = best
            self.text = self.text[: idx + len(stop)] if self.include_stop_str else self.text[:idx]
            self.stopped_by = stop

    def _release(self, upto: int) -> str:
        if upto <= self.num_released:
            return ""
        chunk = self.text[self.num_released : upto]
        self.num_released = upto
        return chunk
