"""Sampling: seeded reproducibility, filters, stop strings, logprobs against HF logits."""

from __future__ import annotations

import pytest
import torch

from engine.detokenizer import TextOutput
from engine.sampler import SamplingRow, sample
from engine.sampling_params import SamplingParams
from tests.helpers import make_engine

FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def _row(**kwargs) -> SamplingRow:
    seed = kwargs.pop("seed", None)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**kwargs), generator, [])


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))

    def draw(seed: int) -> list[int]:
        row = _row(temperature=1.0, seed=seed)
        return [sample(logits, [row])[0][0] for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0]])
    seen = {sample(logits, [_row(top_k=2, seed=s)])[0][0] for s in range(50)}
    assert seen == {0, 1}
    probs = torch.softmax(logits[0], 0)  # ~ [0.66, 0.24, 0.09, ...]
    assert probs[0] < 0.7
    seen = {sample(logits, [_row(top_p=0.7, seed=s)])[0][0] for s in range(50)}
    assert seen == {0, 1}
    seen = {sample(logits, [_row(min_p=0.3, seed=s)])[0][0] for s in range(50)}
    assert seen == {0, 1}
    assert sample(logits, [_row(temperature=0.0)])[0][0] == 0


def test_banned_tokens_are_never_picked_but_logprobs_stay_raw():
    logits = torch.tensor([[9.0, 1.0, 0.0]])
    row = SamplingRow(SamplingParams(temperature=0.0, logprobs=1), None, [0])
    token_id, logprob = sample(logits, [row])[0]
    assert token_id == 1
    assert logprob is not None
    assert logprob.logprob == pytest.approx(float(torch.log_softmax(logits[0], 0)[1]))
    assert logprob.top[0][0] == 0


def test_a_batch_samples_each_row_as_if_alone():
    """Batched greedy argmax and logprobs give every row what sampling it alone gives."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    seeds = {2: 5, 5: 6}  # row index -> seed of its generator
    rows = [
        _row(temperature=0.0),
        _row(temperature=0.0, logprobs=3),
        _row(temperature=0.8, seed=seeds[2], logprobs=0),
        SamplingRow(SamplingParams(temperature=0.0, logprobs=2), None, [int(logits[3].argmax())]),
        _row(temperature=0.0, logprobs=3),
        _row(temperature=0.5, top_k=5, seed=seeds[5]),
    ]
    batched = sample(logits, rows)
    for row_idx, row in enumerate(rows):
        if row_idx in seeds:  # a fresh generator with the same seed replays the draw
            row = row._replace(generator=torch.Generator().manual_seed(seeds[row_idx]))
        assert batched[row_idx] == sample(logits[row_idx : row_idx + 1], [row])[0]
    assert batched[0][0] == int(logits[0].argmax()) and batched[0][1] is None
    assert batched[3][0] != int(logits[3].argmax())  # banned
    assert [len(lp.top) for lp in (batched[1][1], batched[2][1], batched[3][1])] == [3, 0, 2]


def test_stop_string_is_cut_exactly_across_deltas():
    text = TextOutput(stop=["STOP", "\n\n"], include_stop_str=False)
    released = "".join(text.add(delta) for delta in ["Hello wo", "rld S", "TO", "P and more"])
    assert text.stopped_by == "STOP"
    assert released + text.flush() == "Hello world "
    kept = TextOutput(stop=["\n\n"], include_stop_str=True)
    assert kept.add("a\n") == "a"
    assert kept.add("\nb") == "\n\n"
    assert kept.text == "a\n\n"


def test_engine_stop_string_and_stop_token(smollm2):
    engine = make_engine(smollm2)
    prompt = engine.apply_chat_template([{"role": "user", "content": "Count: 1, 2, 3, 4, 5, 6"}])
    free = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert len(free.new_text) > 6
    stop = free.new_text[4:7]
    cut = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]))[0]
    assert cut.new_text == free.new_text[: free.new_text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    stop_token = free.new_token_ids[3]
    by_token = engine.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_token])
    )[0]
    assert by_token.new_token_ids == free.new_token_ids[: free.new_token_ids.index(stop_token) + 1]
    assert by_token.stop_reason == stop_token


def test_min_tokens_and_ignore_eos(smollm2):
    engine = make_engine(smollm2)
    prompt = engine.apply_chat_template(FRANCE)
    short = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=64))[0]
    assert short.finish_reason == "stop" and short.num_output_tokens < 64
    longer = engine.generate(
        [prompt],
        SamplingParams(temperature=0.0, max_tokens=64, min_tokens=short.num_output_tokens + 5),
    )[0]
    assert longer.num_output_tokens >= short.num_output_tokens + 5
    assert not set(longer.new_token_ids[: short.num_output_tokens + 4]) & engine.eos_token_ids
    ignoring = engine.generate(
        [prompt],
        SamplingParams(temperature=0.0, max_tokens=short.num_output_tokens + 3, ignore_eos=True),
    )[0]
    assert ignoring.finish_reason == "length"
    assert ignoring.new_token_ids[: short.num_output_tokens] == short.new_token_ids


def test_logprobs_match_hf_log_softmax(smollm2):
    from transformers import AutoModelForCausalLM

    engine = make_engine(smollm2)
    prompt = engine.apply_chat_template([{"role": "user", "content": "Name a colour."}])
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, logprobs=5))[0]
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2.source_dir), attn_implementation="sdpa")
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + out.new_token_ids])).logits[0]
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)
    assert out.logprobs is not None and len(out.logprobs) == 6
    for step, (token_id, entry) in enumerate(zip(out.new_token_ids, out.logprobs, strict=True)):
        assert entry.token_id == token_id
        assert entry.logprob == pytest.approx(float(expected[step, token_id]), abs=1e-4)
        top_ids = [tid for tid, _ in entry.top]
        assert top_ids == torch.topk(expected[step], 5).indices.tolist()
        for tid, value in entry.top:
            assert value == pytest.approx(float(expected[step, tid]), abs=1e-4)


def test_seeded_engine_sampling_is_reproducible_in_any_batch(smollm2):
    engine = make_engine(smollm2)
    prompt = engine.apply_chat_template([{"role": "user", "content": "Tell me a story."}])
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234)
    alone = engine.generate([prompt], params)[0]
    other = SamplingParams(temperature=1.0, max_tokens=12, seed=99)
    batched = engine.generate([prompt, prompt[:-3], prompt], params)  # noqa: F841
    assert batched[0].new_token_ids == alone.new_token_ids == batched[2].new_token_ids
    mixed = engine.generate([prompt], other)[0]
    assert mixed.new_token_ids != alone.new_token_ids
