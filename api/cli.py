"""The ``tarry`` command line."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from api.tool_pool import DEFAULT_TOOL_WORKERS, DEFAULT_TOOL_WORKERS_PER_KEY
from engine.async_engine import AsyncEngine
from engine.config import AUTO_SPECULATIVE_TOKENS, EngineConfig
from engine.errors import InvalidRequestError, ModelLoadError
from engine.generation_config import describe, parse_override
from engine.llm_engine import LLMEngine
from engine.model_loader import load_model
from engine.sampling_params import SamplingParams
from tools.tool_call import TOOL_CALL_FORMATS

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tarry", description="Agent-oriented LLM inference.")
    parser.add_argument("--version", action="version", version=f"tarry {tarry_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="stream the model's answer to one prompt")
    gen.add_argument("prompt", help="the user message (or raw text with --raw)")
    add_model_args(gen)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--system", default=None, help="system prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt without the chat template")
    serve = commands.add_parser(
        "serve", help="serve the WebSocket session protocol and OpenAI HTTP"
    )
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--redis-url", default=None, help="share sessions and KV through Redis")
    serve.add_argument(
        "--redis-cluster",
        action="store_true",
        help="--redis-url names nodes of a Redis Cluster (comma-separated seeds; the others "
        "are discovered)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted bearer token (repeatable); required off loopback",
    )
    serve.add_argument(
        "--advertise-url",
        default=None,
        help="URL other instances send this one's clients to (default http://HOST:PORT)",
    )
    serve.add_argument(
        "--lease-ttl-s",
        type=float,
        default=10.0,
        help="session lease / instance registration TTL with --redis-url (failover delay)",
    )
    serve.add_argument(
        "--owner-probe-timeout-s",
        type=float,
        default=0.75,
        help="with --redis-url: a session's owner that does not answer its /health within "
        "this is taken for dead, and the session is taken over at once",
    )
    serve.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=10.0,
        help="on SIGTERM, stop accepting and let running responses finish for up to this many "
        "seconds, then cancel the rest and exit",
    )
    serve.add_argument(
        "--session-idle-timeout-s",
        type=float,
        default=3600.0,
        help="a session nobody touched for this long is evicted from memory with its python "
        "sandbox (with --redis-url its record stays resumable; without, it is deleted)",
    )
    serve.add_argument(
        "--max-sessions",
        type=int,
        default=4096,
        help="sessions this server holds, all keys together; beyond it session.create fails "
        "with server_session_limit",
    )
    serve.add_argument(
        "--host-kv-gib",
        type=float,
        default=1.0,
        help="host-memory KV tier size in GiB (0 disables)",
    )
    add_timeout_args(serve)
    add_openai_serving_args(serve)
    return parser


def add_timeout_args(parser: argparse.ArgumentParser) -> None:
    """Timeouts that close connections holding a slot while sending nothing (api.state.Limits)."""
    parser.add_argument(
        "--header-timeout-s", type=float, default=10.0, help="HTTP request headers due within"
    )
    parser.add_argument(
        "--first-event-timeout-s",
        type=float,
        default=30.0,
        help="a WebSocket that sends no frame within this is closed (4000)",
    )
    parser.add_argument(
        "--idle-timeout-s",
        type=float,
        default=600.0,
        help="a WebSocket idle this long between frames is closed (4000)",
    )


def add_openai_serving_args(serve: argparse.ArgumentParser) -> None:
    """The vLLM-style flags of ``tarry serve``: model ids, default sampling, tool parser, logs."""
    serve.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model id(s) clients use (the first is reported); default: the model's name, "
        "plus the alias 'tarry'. Requests naming another model get 404 model_not_found",
    )
    serve.add_argument(
        "--generation-config",
        default="auto",
        help="default sampling for fields a request leaves unset: 'auto' (the model's "
        "generation_config.json; greedy, top_p 0.9 for the embedded SmolLM2), "
        "'vllm' or 'none' (neutral: temperature 1), or a directory holding "
        "generation_config.json",
    )
    serve.add_argument(
        "--override-generation-config",
        default=None,
        help="JSON object merged over the generation config, e.g. '{\"temperature\": 0.2}'; "
        "keys: temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, "
        "frequency_penalty, max_new_tokens (or max_tokens)",
    )
    serve.add_argument(
        "--tool-call-parser",
        default=None,
        choices=TOOL_CALL_FORMATS,
        help="format model tool calls are parsed in (default: chosen from the chat template)",
    )
    serve.add_argument(
        "--tool-workers",
        type=int,
        default=DEFAULT_TOOL_WORKERS,
        help="threads running python tool calls (their own pool, not the turn-end threads)",
    )
    serve.add_argument(
        "--tool-workers-per-key",
        type=int,
        default=DEFAULT_TOOL_WORKERS_PER_KEY,
        help="most tool workers one API key holds at a time; its further calls queue",
    )
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS)


def tarry_version() -> str:
    try:
        return importlib.metadata.version("tarry")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="HF model directory, .gguf file or cached hub id (default: SmolLM2)",
    )
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="KV pool size in GiB")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model's norms and MLPs (inductor; slower start-up)",
    )
    defaults = EngineConfig()
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context limit in tokens, prompt plus output (default: the model's, within the "
        "KV pool)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=defaults.max_num_seqs,
        help=f"most requests in one step (default {defaults.max_num_seqs})",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=defaults.max_num_batched_tokens,
        help=f"token budget of one step (default {defaults.max_num_batched_tokens})",
    )
    parser.add_argument(
        "--speculative-tokens",
        type=int,
        default=None,
        help="speculative decoding by prompt lookup: draft up to this many tokens per step for "
        "each greedy request, copied from its own context and verified by the model (output "
        f"unchanged); 0: off (default: {AUTO_SPECULATIVE_TOKENS['cpu']} on a CPU, 0 on CUDA)",
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template file, or the template itself, replacing the model's",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the model flags ask for; raises ValueError on a bad value."""
    kv_bytes = int(args.kv_cache_gib * (1 << 30)) if args.kv_cache_gib else None
    config = EngineConfig(
        block_size=args.block_size,
        kv_cache_bytes=kv_bytes,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        compile_backend="inductor" if args.compile else None,
        num_speculative_tokens=args.speculative_tokens,
    )
    config.validate()
    return config


def chat_template_from_arg(value: str) -> str:
    """``--chat-template``: ``value`` itself when it is a Jinja template (holds ``{{`` or
    ``{%``), else the contents of the file it names; raises ValueError otherwise."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def engine_from_args(args: argparse.Namespace) -> LLMEngine:
    started = time.perf_counter()
    config = engine_config_from_args(args)
    template = chat_template_from_arg(args.chat_template) if args.chat_template else None
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    if template is not None:
        loaded.tokenizer.chat_template = template
    engine = LLMEngine(loaded, config)
    print(
        f"loaded {loaded.name} ({loaded.architecture}, {loaded.dtype}, {loaded.device}) "
        f"in {time.perf_counter() - started:.1f}s; KV pool {engine.num_kv_blocks} "
        f"blocks x {engine.config.block_size} tokens; context limit {engine.max_model_len}",
        file=sys.stderr,
    )
    return engine


async def _generate(args: argparse.Namespace) -> int:
    engine = engine_from_args(args)
    if args.raw:
        prompt: str | list[int] = args.prompt
    else:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = engine.apply_chat_template(messages)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    async_engine = AsyncEngine(engine)
    async_engine.start()
    try:
        async for out in async_engine.generate(prompt, params):
            print(out.new_text, end="", flush=True)
        print()
    finally:
        async_engine.shutdown()
    return 0


def redis_description(url: str | None, cluster: bool) -> str:
    if url is None:
        return "not configured"
    return f"{'cluster ' if cluster else ''}at {url}"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import build_app
    from api.http_protocol import uvicorn_limits
    from api.server import ServeOptions, build_state, is_loopback
    from api.shutdown import DrainingServer
    from api.state import Limits
    from sessions.redis_connect import check_redis_url

    if not is_loopback(args.host) and not args.api_key:
        raise ValueError(f"--api-key is required to listen on the non-loopback host {args.host}")
    if args.shutdown_timeout_s < 0:
        raise ValueError("--shutdown-timeout-s must be >= 0")
    if args.session_idle_timeout_s <= 0:
        raise ValueError("--session-idle-timeout-s must be > 0")
    if args.max_sessions < 1:
        raise ValueError("--max-sessions must be >= 1")
    if args.owner_probe_timeout_s <= 0:
        raise ValueError("--owner-probe-timeout-s must be > 0")
    if args.redis_cluster and not args.redis_url:
        raise ValueError("--redis-cluster needs --redis-url (one or more nodes of the cluster)")
    if args.redis_url:
        check_redis_url(args.redis_url, args.redis_cluster)  # before the model loads
    override = parse_override(args.override_generation_config)  # before the model loads
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    engine = engine_from_args(args)
    options = ServeOptions(
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        redis_cluster=args.redis_cluster,
        api_keys=tuple(args.api_key),
        host_kv_bytes=int(args.host_kv_gib * (1 << 30)),
        ownership=args.redis_url is not None,
        advertise_url=args.advertise_url,
        lease_ttl_s=args.lease_ttl_s,
        owner_probe_timeout_s=args.owner_probe_timeout_s,
        owner_key_secret=os.environ.get("TARRY_OWNER_KEY_SECRET", "").encode() or None,
        limits=Limits(
            header_timeout_s=args.header_timeout_s,
            first_event_timeout_s=args.first_event_timeout_s,
            idle_timeout_s=args.idle_timeout_s,
        ),
        served_model_names=tuple(args.served_model_name or ()),
        generation_config=args.generation_config,
        override_generation_config=override,
        tool_call_parser=args.tool_call_parser,
        tool_workers=args.tool_workers,
        tool_workers_per_key=args.tool_workers_per_key,
        session_idle_timeout_s=args.session_idle_timeout_s,
        max_sessions=args.max_sessions,
    )
    state = build_state(engine, options)
    print(
        f"tarry: model ids {', '.join(state.served_model_names + state.model_aliases)}; "
        f"default sampling {describe(state.sampling_defaults)} "
        f"(--generation-config {args.generation_config}); max_tokens defaults to "
        f"{state.sampling_defaults.get('max_tokens', 'the rest of the context')}",
        file=sys.stderr,
    )
    print(
        f"tarry: serving {state.model_name} on http://{args.host}:{args.port} "
        f"(WebSocket sessions at ws://{args.host}:{args.port}/v1/sessions, "
        f"Redis {redis_description(args.redis_url, args.redis_cluster)})",
        file=sys.stderr,
        flush=True,
    )
    try:
        config = uvicorn.Config(
            build_app(state),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            ws="websockets-sansio",
            **uvicorn_limits(state.limits),  # frame / body limits and idle timeouts
        )
        server = DrainingServer(config, state, args.shutdown_timeout_s)
        server.run()
        if not server.started:
            return 3  # uvicorn's start-up failure code (e.g. the port is in use)
    finally:
        state.tools.close()  # kill every sandbox interpreter and remove its directory
        state.async_engine.shutdown()
        if state.sessions.ownership is not None:
            state.sessions.ownership.close()  # release leases: other instances take over now
        state.sessions.records.close()
    exit_now(0)


def exit_now(code: int) -> NoReturn:
    """End a served process once it released everything (sandboxes, engine, leases).

    Skips the interpreter's finalization: tearing down torch / transformers module state
    takes 5-8 s on a 2-core machine, which would break the shutdown bound of
    ``--shutdown-timeout-s``. Output is flushed first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "generate":
            return asyncio.run(_generate(args))
    except (ModelLoadError, InvalidRequestError, ValueError) as exc:
        print(f"tarry: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
