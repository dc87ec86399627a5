"""Speculative decoding by prompt lookup: drafts are proposed from the context, verified in one
step, and greedy output stays token-identical to Hugging Face ``generate()`` and to the engine
without drafts; stops, limits and non-greedy requests behave as without drafts."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from engine.llm_engine import merge_outputs
from engine.ngram_proposer import propose_ngram_drafts
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.speculative import FIRST_PAUSE, MISSES_BEFORE_PAUSE, accepted_prefix
from tests.conftest import TINY_ARCHITECTURES
from tests.helpers import greedy, hf_greedy, make_engine, mixed_prompts
from tests.scaleout_helpers import TarryProcess

NUM_TOKENS = 24
DRAFTS = 3


def repetitive_prompts() -> list[list[int]]:
    """Prompts that repeat a pattern (as agents repeat identifiers and their own replies), so
    the lookup has matches, and two random ones, where it mostly has none."""
    pattern = list(range(500, 507))
    return [pattern * 4, [900, 901] + pattern * 3 + [902], *mixed_prompts(5, 2, 10, 30)]


def run(
    engine, prompts: list[list[int]], params: SamplingParams
) -> tuple[list[list[int]], list[int]]:
    """Each prompt's generated tokens (all admitted at once) and how many steps yielded them."""
    merged: dict[str, RequestOutput] = {}
    num_outputs = dict.fromkeys((f"r{idx}" for idx in range(len(prompts))), 0)
    for idx, prompt in enumerate(prompts):
        engine.add_request(f"r{idx}", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            merged[out.request_id] = merge_outputs(merged.get(out.request_id), out)
            num_outputs[out.request_id] += 1
    engine.check_integrity()
    return [merged[key].new_token_ids for key in num_outputs], list(num_outputs.values())


def test_ngram_lookup_copies_what_followed_the_longest_recent_match():
    assert propose_ngram_drafts([5, 6, 7, 9, 5, 6], 2) == [7, 9]
    # the 3-token suffix [1, 2, 3] wins over the more recent 2-token match of [2, 3]
    assert propose_ngram_drafts([1, 2, 3, 8, 2, 3, 4, 1, 2, 3], 1) == [8]
    assert propose_ngram_drafts([4, 5, 1, 4, 5, 2, 4, 5], 3) == [2, 4, 5]  # most recent one
    assert propose_ngram_drafts([1, 2, 3], 3) == []  # nothing repeats
    assert propose_ngram_drafts([7, 1, 7], 3) == []  # a lone token is not looked up
    assert propose_ngram_drafts([7, 7, 7], 3) == [7]
    assert propose_ngram_drafts([7, 1, 7], 3, min_ngram=1) == [1, 7]
    assert propose_ngram_drafts([7, 7, 7], 0) == [] and propose_ngram_drafts([], 2) == []


def test_accepted_prefix_stops_after_the_first_wrong_draft():
    assert accepted_prefix([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all right: one more
    assert accepted_prefix([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # the model's token replaces it
    assert accepted_prefix([5, 6, 7], [4, 6, 7, 8]) == [4]


class OracleProposer:
    """Drafts from the known greedy continuations, every third proposal wrong from its second
    token on, so each step accepts all its drafts, some, or none: the verification path is
    exercised whatever a random tiny model generates (n-gram lookup rarely hits there)."""

    def __init__(self, prompts: list[list[int]], continuations: list[list[int]]) -> None:
        self.known = list(zip(prompts, continuations, strict=True))
        self.calls = 0

    def __call__(self, token_ids, num_drafts: int) -> list[int]:
        self.calls += 1
        for prompt, continuation in self.known:
            if list(token_ids[: len(prompt)]) == prompt:
                done = len(token_ids) - len(prompt)
                drafts = continuation[done : done + num_drafts]
                if self.calls % 3 == 0 and len(drafts) > 1:
                    drafts[1] = (drafts[1] + 1) % 1000
                return drafts
        return []


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
def test_greedy_output_with_drafts_matches_hf(arch, tiny_model_dirs: dict[str, Path]):
    model_dir = tiny_model_dirs[arch]
    prompts = repetitive_prompts()
    expected = hf_greedy(model_dir, prompts, NUM_TOKENS)
    plain, plain_steps = run(make_engine(model_dir), prompts, greedy(NUM_TOKENS))
    assert plain == expected and plain_steps == [NUM_TOKENS] * len(prompts)
    engine = make_engine(model_dir, num_speculative_tokens=DRAFTS)
    engine.draft_proposer = OracleProposer(prompts, expected)
    drafted, drafted_steps = run(engine, prompts, greedy(NUM_TOKENS))
    assert drafted == expected
    assert max(drafted_steps) < NUM_TOKENS / 2  # most drafts accepted: far fewer steps
    # the n-gram lookup itself: the same tokens whatever it drafts
    ngram = make_engine(model_dir, num_speculative_tokens=DRAFTS)
    assert run(ngram, prompts, greedy(NUM_TOKENS))[0] == expected


def test_drafts_respect_max_tokens_stop_tokens_and_stop_strings(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    prompts = repetitive_prompts()[:2]
    reference, _ = run(make_engine(model_dir), prompts, greedy(NUM_TOKENS))
    engine = make_engine(model_dir, num_speculative_tokens=DRAFTS)
    for max_tokens in (1, 2, 5):  # fewer tokens left than drafts: never one too many
        tokens, _ = run(engine, prompts, greedy(max_tokens))
        assert tokens == [ref[:max_tokens] for ref in reference]
    # a stop token that the drafts run past: generation ends at it
    stop_token = reference[0][6]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, stop_token_ids=[stop_token])
    tokens, _ = run(engine, prompts[:1], params)
    assert tokens[0] == reference[0][: reference[0].index(stop_token) + 1]
    # a stop string: the same text as without drafts
    stop_text = engine.tokenizer.decode(reference[0][4:6])
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, stop=[stop_text])
    with_drafts = engine.generate([prompts[0]], params)[0]
    without = make_engine(model_dir).generate([prompts[0]], params)[0]
    assert (with_drafts.new_text, with_drafts.finish_reason) == (
        without.new_text,
        without.finish_reason,
    )


def test_only_plain_greedy_requests_draft(tiny_model_dirs):
    """Sampled, penalised and logprobs requests take one token per step, beside drafting
    greedy ones, and their output is what it is without drafts."""
    model_dir = tiny_model_dirs["llama"]
    prompt = repetitive_prompts()[0]
    reference = make_engine(model_dir).generate([prompt], greedy(8))[0].new_token_ids
    engine = make_engine(model_dir, num_speculative_tokens=DRAFTS)
    engine.draft_proposer = OracleProposer([prompt], [reference])  # drafts for any of them
    others = {
        "sampled": SamplingParams(temperature=0.8, seed=3, max_tokens=8),
        "penalised": SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=8),
        "logprobs": SamplingParams(temperature=0.0, logprobs=2, max_tokens=8),
    }
    engine.add_request("greedy", prompt, greedy(8))
    for name, params in others.items():
        engine.add_request(name, prompt, params)
    tokens_per_step: dict[str, list[int]] = {name: [] for name in ["greedy", *others]}
    merged: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens_per_step[out.request_id].append(len(out.new_token_ids))
            merged[out.request_id] = merge_outputs(merged.get(out.request_id), out)
    assert max(tokens_per_step["greedy"]) > 1 and merged["greedy"].new_token_ids == reference
    for name, params in others.items():
        assert set(tokens_per_step[name]) == {1}
        alone = make_engine(model_dir).generate([prompt], params)[0]
        assert merged[name].new_token_ids == alone.new_token_ids
    assert len(merged["logprobs"].logprobs or []) == 8


def test_smollm2_drafts_match_hf_on_an_agent_turn(smollm2):
    """The embedded model continuing a list it started (as in the agent benchmark): drafts
    accepted, output unchanged."""
    tokenizer = smollm2.tokenizer
    text = "Task 1: Deploy new server function.\n\nTask 2: Deploy new server function.\n\n"
    prompt = tokenizer.encode(text)
    expected = hf_greedy(smollm2.source_dir, [prompt], 20, device="cpu")
    tokens, steps = run(make_engine(smollm2, num_speculative_tokens=DRAFTS), [prompt], greedy(20))
    assert tokens == expected
    assert steps[0] <= 12, tokenizer.decode(tokens[0])  # 20 tokens in 11 steps here


def test_a_request_whose_drafts_keep_failing_stops_drafting(tiny_model_dirs):
    """Text the lookup cannot predict does not pay for wrong drafts every step: after
    ``MISSES_BEFORE_PAUSE`` failed steps the request pauses drafting, twice as long each time."""
    model_dir = tiny_model_dirs["llama"]
    prompt = repetitive_prompts()[0]
    calls: list[int] = []

    def wrong(token_ids, num_drafts: int) -> list[int]:
        calls.append(len(token_ids))
        return [7] * num_drafts  # token 7: never what the random model picks here

    engine = make_engine(model_dir, num_speculative_tokens=DRAFTS)
    engine.draft_proposer = wrong
    tokens, steps = run(engine, [prompt], greedy(NUM_TOKENS))
    assert tokens == run(make_engine(model_dir), [prompt], greedy(NUM_TOKENS))[0]
    # tries at output tokens 1-3, a pause of 4 -> 7-9, of 8 -> 17-19, of 16 -> past the end
    assert (MISSES_BEFORE_PAUSE, FIRST_PAUSE) == (3, 4)
    assert [n - len(prompt) for n in calls] == [1, 2, 3, 7, 8, 9, 17, 18, 19]
    assert steps == [NUM_TOKENS]


def test_real_tarry_serve_drafts_by_default_and_counts_them(redis_server, tmp_path, smollm2):
    """The user's path: a plain ``tarry serve`` on the CPU drafts (default 3 tokens), shows it
    in ``/metrics``, and answers what the engine answers without drafts."""
    prompt = "Task 1: Deploy new server function.\n\nTask 2: Deploy new server function.\n\n"
    body = {"model": "tarry", "prompt": prompt, "max_tokens": 40, "temperature": 0}
    server = TarryProcess(redis_server, tmp_path).start()
    try:
        server.wait_ready()
        reply = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        server.stop()
    gauges = {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in metrics.splitlines())
        if name.startswith("tarry_spec_")
    }
    assert 0 < gauges["tarry_spec_accepted_draft_tokens"] <= gauges["tarry_spec_draft_tokens"]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    without = make_engine(smollm2).generate([prompt], params)[0]
    assert reply["choices"][0]["text"] == without.new_text
