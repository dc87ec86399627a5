"""Incremental detokenization: every path gives the tokenizer's own text."""

from __future__ import annotations

import random

from engine.detokenizer import OffsetDetokenizer, StreamDetokenizer, new_detokenizer


def test_stream_detokenizer_matches_the_tokenizer(smollm2):
    tokenizer = smollm2.tokenizer
    rng = random.Random(0)
    for _ in range(300):  # special tokens (ids < 17) and partial UTF-8 sequences included
        ids = [rng.choice([rng.randrange(17), rng.randrange(49152)]) for _ in range(5)]
        detokenizer = new_detokenizer(tokenizer, [])
        assert isinstance(detokenizer, StreamDetokenizer)
        streamed = "".join(detokenizer.append(token_id) for token_id in ids)
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    text = "Héllo wörld, 你好! 🙂"
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("She wrote:", add_special_tokens=False)
    for detokenizer in (new_detokenizer(tokenizer, prompt), OffsetDetokenizer(tokenizer, prompt)):
        assert "".join(detokenizer.append(token_id) for token_id in ids) == text


def test_a_custom_tokenizers_decode_is_used():
    class Custom:
        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            return "x" * len(ids) if skip_special_tokens else ""

    detokenizer = new_detokenizer(Custom(), [])
    assert isinstance(detokenizer, OffsetDetokenizer)
    assert detokenizer.append(4) + detokenizer.append(5) == "xx"
