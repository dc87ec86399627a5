"""Incremental detokenization: the decode fast path gives the tokenizer's own text."""

from __future__ import annotations

import random

from engine.detokenizer import IncrementalDetokenizer, text_decoder


def test_text_decoder_matches_the_tokenizer(smollm2):
    tokenizer = smollm2.tokenizer
    decode = text_decoder(tokenizer)
    rng = random.Random(0)
    for _ in range(300):  # special tokens (ids < 17) and partial UTF-8 sequences included
        ids = [rng.choice([rng.randrange(17), rng.randrange(49152)]) for _ in range(5)]
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
    text = "Héllo wörld, 你好! 🙂"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert "".join(detokenizer.append(token_id) for token_id in ids) == text


def test_text_decoder_uses_a_custom_tokenizers_decode():
    class Custom:
        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            return f"{len(ids)}{skip_special_tokens}"

    assert text_decoder(Custom())([4, 5]) == "2True"
