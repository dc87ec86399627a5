"""The vLLM-style ``tarry serve`` flags: parsed, wired through, and seen working in a real
``tarry serve`` process driven by the official openai client."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from api.cli import build_parser, chat_template_from_arg, engine_config_from_args
from api.tool_runtime import ToolRuntime
from engine.generation_config import (
    EMBEDDED_MODEL_GENERATION_CONFIG,
    parse_override,
    sampling_defaults,
)
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.scaleout_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tarry(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``tarry ARGS`` from this tree (``python -m api.cli``)."""
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=timeout,
    )


@contextlib.contextmanager
def tarry_serve(log_path: Path, *flags: str) -> Iterator[str]:
    """A real ``tarry serve`` (embedded model, CPU) with ``flags``; yields its base URL."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--device", "cpu"]
            + list(flags),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tarry exited:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"tarry did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_version_flag():
    done = tarry("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == "tarry 0.1.0"


def test_serve_flags_parse_into_the_engine_config_and_options():
    args = build_parser().parse_args(
        [
            "serve",
            "--served-model-name",
            "smol",
            "alias",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "3",
            "--max-num-batched-tokens",
            "128",
            "--tool-call-parser",
            "llama3_json",
            "--chat-template",
            PLAIN_TEMPLATE,
            "--log-level",
            "debug",
            "--generation-config",
            "vllm",
            "--override-generation-config",
            '{"temperature": 0.3, "max_new_tokens": 7}',
            "--speculative-tokens",
            "5",
        ]
    )
    assert args.served_model_name == ["smol", "alias"]
    assert args.tool_call_parser == "llama3_json" and args.log_level == "debug"
    assert chat_template_from_arg(args.chat_template) == PLAIN_TEMPLATE
    config = engine_config_from_args(args)
    assert (config.max_model_len, config.max_num_seqs, config.max_num_batched_tokens) == (
        512,
        3,
        128,
    )
    assert config.speculative_tokens_for("cuda") == 5
    auto = engine_config_from_args(build_parser().parse_args(["serve"]))
    assert (auto.speculative_tokens_for("cpu"), auto.speculative_tokens_for("cuda")) == (3, 0)
    assert parse_override(args.override_generation_config) == {
        "temperature": 0.3,
        "max_tokens": 7,
    }
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tool-call-parser", "nope"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "loud"])


def test_bad_flag_values_exit_with_a_clear_error_before_loading(tmp_path):
    cases = [  # (flags, what stderr must say); each is its own `tarry serve`, run side by side
        (("--override-generation-config", '{"temprature": 0.1}'), "unknown keys ['temprature']"),
        (("--override-generation-config", "{not json"), "not valid JSON"),
        (("--chat-template", str(tmp_path / "missing.jinja")), "neither a file nor a Jinja"),
        (("--max-num-seqs", "0"), "max_num_seqs"),
        (("--speculative-tokens", "8"), "num_speculative_tokens must be in 0..7"),
        (("--max-sessions", "0"), "--max-sessions must be >= 1"),
        (("--owner-probe-timeout-s", "0"), "--owner-probe-timeout-s must be > 0"),
    ]
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        runs = list(pool.map(lambda case: tarry("serve", *case[0]), cases))
    for (flags, message), done in zip(cases, runs, strict=True):
        assert done.returncode == 2 and message in done.stderr, (flags, done.stderr[-500:])


def test_generation_config_modes(tmp_path, smollm2):
    embedded = sampling_defaults(smollm2.source_dir, embedded=True)
    assert embedded == EMBEDDED_MODEL_GENERATION_CONFIG
    assert sampling_defaults(smollm2.source_dir, embedded=True, mode="vllm") == {}
    assert sampling_defaults(smollm2.source_dir, embedded=True, mode="none") == {}
    model_dir = tmp_path / "qwen-like"
    model_dir.mkdir()
    (model_dir / "generation_config.json").write_text(
        json.dumps(
            {
                "do_sample": True,
                "temperature": 0.7,
                "top_p": 0.8,
                "top_k": 20,
                "repetition_penalty": 1.05,
                "eos_token_id": [1, 2],
            }
        )
    )
    expected = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert sampling_defaults(model_dir, embedded=False) == expected
    from_dir = sampling_defaults(smollm2.source_dir, True, str(model_dir), {"top_k": 5})
    assert from_dir == {**expected, "top_k": 5}
    with pytest.raises(ValueError, match="directory holding generation_config.json"):
        sampling_defaults(smollm2.source_dir, True, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="temperature"):
        sampling_defaults(smollm2.source_dir, True, "auto", {"temperature": -1})


def test_engine_honours_max_num_seqs_and_max_num_batched_tokens(tiny_model_dirs):
    from engine.model_loader import load_model

    args = build_parser().parse_args(
        ["serve", "--max-num-seqs", "2", "--max-num-batched-tokens", "40", "--max-model-len", "90"]
    )
    config = engine_config_from_args(args)
    config.num_kv_blocks = 64
    config.check_integrity = True
    engine = LLMEngine(load_model(str(tiny_model_dirs["llama"]), device="cpu"), config)
    assert engine.max_model_len == 90
    for idx in range(3):
        engine.add_request(f"r{idx}", list(range(10, 40)), SamplingParams(max_tokens=4))
    engine.step()
    assert len(engine.scheduler.running) <= 2
    computed = sum(r.num_computed_tokens for r in engine.scheduler.running)
    assert computed <= 40
    open_ended = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    outputs = engine.generate([list(range(100, 150))], open_ended)
    assert outputs[0].num_output_tokens == 40  # the rest of the 90-token context


def test_tool_call_parser_override_decides_the_parse(smollm2):
    runtime = ToolRuntime(smollm2.tokenizer, 49152, [2])
    assert runtime.call_format == "hermes"  # from SmolLM2's template
    llama = ToolRuntime(smollm2.tokenizer, 49152, [2], tool_call_parser="llama3_json")
    assert llama.call_format == "llama3_json"
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    parser = llama.parser()
    events = parser.feed(text) + parser.finish()
    calls = [e.call for e in events if hasattr(e, "call")]
    assert [c.name for c in calls] == ["get_weather"]
    hermes = runtime.parser()
    assert not [e for e in hermes.feed(text) + hermes.finish() if hasattr(e, "call")]
    runtime.close()  # removes its temporary sandbox root
    llama.close()


def test_real_tarry_serve_with_vllm_flags(tmp_path, smollm2):
    template_file = tmp_path / "plain.jinja"
    template_file.write_text(PLAIN_TEMPLATE)
    log_path = tmp_path / "serve.log"
    flags = [
        "--served-model-name",
        "smol",
        "smol-alias",
        "--max-model-len",
        "128",
        "--max-num-seqs",
        "2",
        "--max-num-batched-tokens",
        "64",
        "--chat-template",
        str(template_file),
        "--log-level",
        "warning",
        "--generation-config",
        "vllm",
        "--override-generation-config",
        '{"temperature": 0, "max_new_tokens": 5}',
    ]
    with tarry_serve(log_path, *flags) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smol", "smol-alias"]
        assert client.models.retrieve("smol").model_extra["max_model_len"] == 128
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.chat.completions.create(
                model="tarry", messages=[{"role": "user", "content": "Hi"}]
            )
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        default = client.chat.completions.create(model="smol-alias", messages=messages)
        assert default.model == "smol"
        assert default.usage.completion_tokens == 5  # max_new_tokens from the override
        expected_prompt = smollm2.tokenizer.apply_chat_template(
            messages,
            chat_template=PLAIN_TEMPLATE,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        assert default.usage.prompt_tokens == len(expected_prompt)  # --chat-template applied
        explicit = client.chat.completions.create(model="smol", messages=messages, max_tokens=2)
        assert explicit.usage.completion_tokens == 2
        greedy = client.chat.completions.create(
            model="smol", messages=messages, max_tokens=5, temperature=0
        )
        assert greedy.choices[0].message.content == default.choices[0].message.content
        long_prompt = [{"role": "user", "content": "word " * 200}]
        with pytest.raises(openai.BadRequestError, match="context (limit )?is 128"):
            client.chat.completions.create(model="smol", messages=long_prompt)
        chunked = [{"role": "user", "content": "word " * 80}]  # > 64: prefilled in two steps
        assert (
            client.chat.completions.create(model="smol", messages=chunked).usage.prompt_tokens > 64
        )
    log = log_path.read_text()
    assert "model ids smol, smol-alias" in log
    assert "default sampling max_tokens=5 temperature=0" in log
    assert '"POST /v1/chat/completions HTTP/1.1" 200' not in log  # --log-level warning
