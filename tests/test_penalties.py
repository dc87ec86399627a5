"""Logit bias and presence / frequency / repetition penalties, as vLLM defines them, against
values computed by hand; and an engine run where a penalty changes a greedy answer."""

from __future__ import annotations

import pytest
import torch

from engine.errors import InvalidRequestError
from engine.sampler import SamplingRow, apply_penalties, sample
from engine.sampling_params import SamplingParams
from tests.helpers import make_engine

LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0]  # token ids 0..4


def _penalized(**kwargs: float) -> list[float]:
    return apply_penalties(
        torch.tensor(LOGITS),
        prompt_token_ids=[1, 4],
        output_token_ids=[0, 0, 3],
        presence_penalty=kwargs.get("presence", 0.0),
        frequency_penalty=kwargs.get("frequency", 0.0),
        repetition_penalty=kwargs.get("repetition", 1.0),
    ).tolist()


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    # Seen: prompt {1, 4} + output {0, 3}; token 2 is unseen and keeps its logit.
    expected = [2.0 / 2, -1.0 * 2, 0.5, 3.0 / 2, -2.0 * 2]
    assert _penalized(repetition=2.0) == pytest.approx(expected)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    # Output counts: token 0 twice, token 3 once; prompt tokens 1 and 4 are not penalised.
    expected = [2.0 - 0.5 * 2 - 0.25, -1.0, 0.5, 3.0 - 0.5 * 1 - 0.25, -2.0]
    assert _penalized(frequency=0.5, presence=0.25) == pytest.approx(expected)
    negative = [2.0 + 1.0 * 2, -1.0, 0.5, 3.0 + 1.0, -2.0]  # negative = encourage repeats
    assert _penalized(frequency=-1.0) == pytest.approx(negative)


def test_all_penalties_compose_in_vllm_order():
    # Repetition first (on the raw sign), then frequency and presence subtract.
    expected = [2.0 / 1.5 - 0.1 * 2 - 0.3, -1.5, 0.5, 3.0 / 1.5 - 0.1 - 0.3, -3.0]
    got = _penalized(repetition=1.5, frequency=0.1, presence=0.3)
    assert got == pytest.approx(expected)


def test_logit_bias_and_penalties_change_the_greedy_pick():
    logits = torch.tensor([LOGITS])

    def pick(**kwargs) -> int:
        params = SamplingParams(temperature=0.0, **kwargs)
        row = SamplingRow(params, None, [], output_token_ids=[3, 3], prompt_token_ids=[1])
        return sample(logits, [row])[0][0]

    assert pick() == 3
    assert pick(logit_bias={2: 10.0}) == 2  # 0.5 + 10 beats 3.0
    assert pick(logit_bias={3: -100.0}) == 0
    assert pick(frequency_penalty=1.0) == 0  # 3.0 - 2 = 1.0 < 2.0
    assert pick(presence_penalty=1.5) == 0  # 3.0 - 1.5 = 1.5 < 2.0
    assert pick(repetition_penalty=2.0) == 0  # 3.0 / 2 = 1.5 < 2.0
    assert pick(presence_penalty=0.5) == 3  # 2.5 still wins


def test_logprobs_stay_raw_under_bias():
    logits = torch.tensor([LOGITS])
    params = SamplingParams(temperature=0.0, logprobs=1, logit_bias={2: 10.0})
    token_id, logprob = sample(logits, [SamplingRow(params, None, [])])[0]
    assert token_id == 2 and logprob is not None
    assert logprob.logprob == pytest.approx(float(torch.log_softmax(logits[0], 0)[2]))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"logit_bias": {1: 101.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ],
)
def test_bad_penalties_are_rejected(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs).validate()


def test_engine_applies_penalties_and_rejects_out_of_vocab_bias(smollm2):
    engine = make_engine(smollm2)
    prompt = engine.apply_chat_template(
        [{"role": "user", "content": "Repeat the word 'yes' ten times."}]
    )
    plain = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))[0]
    first = plain.new_token_ids[0]
    biased = engine.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=24, logit_bias={first: -100.0})
    )[0]
    assert biased.new_token_ids[0] != first
    repeated = max(set(plain.new_token_ids), key=plain.new_token_ids.count)
    penalized = engine.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=24, frequency_penalty=2.0)
    )[0]
    assert penalized.new_token_ids.count(repeated) < plain.new_token_ids.count(repeated)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.add_request("oov", prompt, SamplingParams(logit_bias={engine.vocab_size: 1.0}))
    engine.check_integrity()
