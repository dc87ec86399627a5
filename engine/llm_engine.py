"""The synchronous engine: admit requests, run steps, hand back output deltas.

One ``step`` = schedule -> one packed forward pass -> sample -> detokenize/stop. Not
thread-safe; ``AsyncEngine`` drives it from one thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from engine.block_pool import BlockHash
from engine.config import EngineConfig, GiB
from engine.decode_graph import DecodeOptions
from engine.detokenizer import Detokenizer, TextOutput, new_detokenizer
from engine.errors import InvalidRequestError
from engine.fingerprint import model_fingerprint
from engine.kv_cache_manager import KVCacheManager
from engine.kv_store import KVStore
from engine.model_loader import LoadedModel
from engine.model_runner import KV_LAYOUT, ModelRunner, kv_shape_of
from engine.ngram_proposer import propose_ngram_drafts
from engine.offload_manager import OffloadManager
from engine.outputs import RequestOutput, TokenLogprob
from engine.pool_stats import PoolStats
from engine.request import Request, RequestStatus
from engine.sampler import SamplingRow, sample
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.speculative import (
    DraftProposer,
    accepted_prefix,
    note_verification,
    propose_drafts,
    split_logits,
)
from engine.step_inputs import SeqChunk

logger = logging.getLogger(__name__)
OPEN_ENDED_LOG_EVERY = 1024  # log an open-ended request's progress every this many tokens
LOAD_WAIT_S = 0.02  # an idle step waits this long at most for a prefix load (then polls again)


class OpenEndedLoad(NamedTuple):
    """Unfinished requests without ``max_tokens`` (they may run to the context limit), for
    ``/metrics``: how many, the most tokens one has generated, the oldest one's age."""

    num_requests: int
    max_output_tokens: int
    oldest_age_s: float


@dataclass
class _RequestState:
    """Per-request state that lives outside the scheduler: text and RNG."""

    request: Request
    detokenizer: Detokenizer
    text: TextOutput
    generator: torch.Generator | None


class LLMEngine:
    """Owns the model runner, KV cache manager and scheduler for one model.

    With a ``kv_store`` (host memory / Redis tiers), waiting requests first restore the blocks
    of their prefix that the store holds (so they are not recomputed), preempted requests
    swap their full blocks out to it, and pinned contexts are offloaded to it before their
    pins are released under memory pressure. Pins and that store traffic belong to one
    ``OffloadManager`` (``self.offload``); the methods below are the engine's surface for them.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        kv_store: KVStore | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.config.validate()
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        kv_shape = kv_shape_of(loaded.config)
        block_size = self.config.block_size
        num_blocks = self._num_blocks(kv_shape.bytes_per_block(block_size, loaded.dtype))
        self.fingerprint = model_fingerprint(
            loaded.architecture,
            loaded.weights_digest,
            loaded.dtype,
            block_size,
            KV_LAYOUT,
            (kv_shape.num_layers, 2, block_size, kv_shape.num_kv_heads, kv_shape.head_dim),
        )
        self.model_runner = ModelRunner(loaded, num_blocks, block_size)
        # One block of every layer, as stored off the device: [layers, 2, block, kv_heads, dim].
        self.kv_block_shape = (
            kv_shape.num_layers,
            2,
            block_size,
            kv_shape.num_kv_heads,
            kv_shape.head_dim,
        )
        self.kv_manager = KVCacheManager(
            num_blocks, block_size, self.config.enable_prefix_caching, self.fingerprint.encode()
        )
        self.offload = OffloadManager(self.kv_manager, self.model_runner.kv_cache, kv_store)
        self.scheduler = Scheduler(
            self.kv_manager,
            self.config.max_num_batched_tokens,
            self.config.max_num_seqs,
            reclaim=self.offload.reclaim,
            on_preempt=self.offload.swap_out,
            restore=self.offload.restore_prefix,
            poll_restores=self.offload.poll_restores,
            cancel_restore=self.offload.cancel_restore,
        )
        self.num_open_ended_requests = 0  # admitted without max_tokens, since start
        model_max = getattr(loaded.config, "max_position_embeddings", None) or 1 << 30
        self.max_model_len = min(
            self.config.max_model_len or model_max, model_max, num_blocks * block_size
        )
        # Decode steps: static bucket-padded inputs, CUDA graphs on CUDA (engine.decode_graph).
        self.model_runner.setup_decode(DecodeOptions.from_config(self.config, self.max_model_len))
        self.eos_token_ids = loaded.eos_token_ids()
        self.vocab_size = int(loaded.config.vocab_size)
        self._states: dict[str, _RequestState] = {}
        self.num_steps = 0
        # Speculative decoding: drafts per step (config's, or by device when it says None)
        # and where they come from (replaceable).
        self.num_speculative_tokens = self.config.speculative_tokens_for(loaded.device.type)
        self.draft_proposer: DraftProposer = propose_ngram_drafts
        self.num_draft_tokens = 0  # drafts verified since start
        self.num_accepted_draft_tokens = 0  # of which accepted

    def _num_blocks(self, bytes_per_block: int) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_bytes
        if budget is None and self.loaded.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.loaded.device)
            budget = int(free * self.config.gpu_memory_fraction)
        budget = budget or GiB
        return max(1, budget // bytes_per_block)

    # -- requests ----------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of a chat, ending with the assistant's generation prompt."""
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        cache_salt: str = "",
    ) -> Request:
        """Validate and queue a request. Raises InvalidRequestError and changes nothing if the
        request is malformed (empty or over-long prompt, bad token ids, bad sampling values,
        a ``logit_bias`` id outside the vocabulary, duplicate id)."""
        params = params or SamplingParams()
        params.validate()
        if request_id in self._states:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise InvalidRequestError(
                f"logit_bias token ids must be in [0, {self.vocab_size}), "
                f"got {max(params.logit_bias)}"
            )
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate_prompt(token_ids)
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            cache_salt=cache_salt,
            eos_token_ids=self.eos_token_ids,
        )
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model_runner.device).manual_seed(params.seed)
        self._states[request_id] = _RequestState(
            request,
            new_detokenizer(self.tokenizer, token_ids),
            TextOutput(params.stop, params.include_stop_str_in_output),
            generator,
        )
        self.scheduler.add_request(request)
        if params.max_tokens is None:
            self.num_open_ended_requests += 1
            logger.info(
                "request %s has no max_tokens: it may generate up to %d tokens (the rest of "
                "the context)",
                request_id,
                self.max_model_len - len(token_ids),
            )
        return request

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens, but this engine's context limit is "
                f"{self.max_model_len} tokens (prompt plus at least one generated token)"
            )
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {self.vocab_size})"
            )

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        state = self._states.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.finish(state.request, RequestStatus.FINISHED_ABORTED)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step and return an output for every request that sampled."""
        if self.num_speculative_tokens > 0:
            propose_drafts(
                self.scheduler.running,
                self.num_speculative_tokens,
                self.max_model_len,
                self.draft_proposer,
            )
        schedule = self.scheduler.schedule()  # restores each admitted request's prefix first
        self.offload.write_back_evicted()  # before the forward pass overwrites them
        if not schedule.scheduled:
            if self.scheduler.loading:  # only prefix loads to wait for: sleep, do not spin
                self.offload.wait_for_loads(LOAD_WAIT_S)
            return []
        chunks = [self._chunk(request, num_new) for request, num_new in schedule.scheduled]
        logits = self.model_runner.execute(chunks)
        to_sample = self.scheduler.update_after_step(schedule)
        outputs = self._sample_and_verify(logits, to_sample)
        self.num_steps += 1
        if self.config.check_integrity:
            self.check_integrity()
        return outputs

    def _chunk(self, request: Request, num_new: int) -> SeqChunk:
        """The step's input for ``request``: its next ``num_new`` tokens (draft tokens last)."""
        drafts = request.spec_token_ids
        start = request.num_computed_tokens
        end = start + num_new - len(drafts)
        return SeqChunk(
            token_ids=request.all_token_ids[start:end] + drafts,
            start_pos=start,
            block_ids=self.kv_manager.get_block_ids(request.request_id),
            needs_logits=end == request.num_tokens,
            num_logits=1 + len(drafts),
        )

    def _sample_and_verify(
        self, logits: torch.Tensor, to_sample: list[Request]
    ) -> list[RequestOutput]:
        """One output per request of ``to_sample``: a sampled token, or the verified tokens of
        a request that drafted (see ``engine.speculative``)."""
        plain_logits, targets = split_logits(logits, to_sample)
        plain = [request for request in to_sample if not request.spec_token_ids]
        rows = [self._sampling_row(request) for request in plain]
        sampled = iter(zip(plain, sample(plain_logits, rows), strict=True) if plain else ())
        verified = iter(targets)
        outputs = []
        for request in to_sample:
            if request.spec_token_ids:
                outputs.append(self._emit_verified(request, next(verified)))
            else:
                _, (token_id, logprob) = next(sampled)
                outputs.append(self._process_token(request, token_id, logprob))
        return outputs

    def _emit_verified(self, request: Request, targets: list[int]) -> RequestOutput:
        """Emit the tokens a drafting request's step yields, one at a time (each may stop it),
        counting each accepted draft as computed before the token after it."""
        tokens = accepted_prefix(request.spec_token_ids, targets)
        note_verification(request, len(tokens) - 1)
        self.num_draft_tokens += len(request.spec_token_ids)
        self.num_accepted_draft_tokens += len(tokens) - 1
        request.spec_token_ids = []
        merged: RequestOutput | None = None
        for idx, token_id in enumerate(tokens):
            if idx:
                request.num_computed_tokens += 1  # the draft this token follows was right
            merged = merge_outputs(merged, self._process_token(request, token_id, None))
            if merged.finished:
                return merged
        self.kv_manager.cache_full_blocks(request)
        assert merged is not None
        return merged

    def _sampling_row(self, request: Request) -> SamplingRow:
        params = request.sampling_params
        banned: list[int] = []
        if request.num_output_tokens < params.min_tokens:
            banned = request.banned_before_min_tokens()
        generator = self._states[request.request_id].generator
        return SamplingRow(
            params, generator, banned, request.output_token_ids, request.prompt_token_ids
        )

    def _process_token(
        self, request: Request, token_id: int, logprob: TokenLogprob | None
    ) -> RequestOutput:
        state = self._states[request.request_id]
        request.append_output_token(token_id)
        new_text = state.text.add(state.detokenizer.append(token_id))
        status = self._stop_status(request, token_id, state.text)
        if request.sampling_params.max_tokens is None:
            self._log_open_ended(request, status)
        if status is not None:
            new_text += state.text.flush()
            self.scheduler.finish(request, status)
            del self._states[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token_id],
            new_text=new_text,
            finished=status is not None,
            finish_reason=status.value if status is not None else None,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(0, request.num_cached_tokens),
            num_restored_tokens=request.num_restored_tokens,
            restored_tokens_by_tier=dict(request.restored_tokens_by_tier),
            num_output_tokens=request.num_output_tokens,
            logprobs=[logprob] if logprob is not None else None,
        )

    def _stop_status(
        self, request: Request, token_id: int, text: TextOutput
    ) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token_id in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if text.stopped_by is not None:
                request.stop_reason = text.stopped_by
                return RequestStatus.FINISHED_STOPPED
        if (
            params.max_tokens is not None and request.num_output_tokens >= params.max_tokens
        ) or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _log_open_ended(self, request: Request, status: RequestStatus | None) -> None:
        """Make a request without ``max_tokens`` visible while it runs long and when it runs
        into the context limit."""
        age_s = time.monotonic() - request.arrival_time
        if status is RequestStatus.FINISHED_LENGTH:
            logger.warning(
                "request %s ran to the context limit (%d tokens) without max_tokens: "
                "%d tokens generated in %.1f s",
                request.request_id,
                self.max_model_len,
                request.num_output_tokens,
                age_s,
            )
        elif status is None and request.num_output_tokens % OPEN_ENDED_LOG_EVERY == 0:
            logger.warning(
                "request %s has generated %d tokens in %.1f s without max_tokens; it may run "
                "to the context limit of %d tokens",
                request.request_id,
                request.num_output_tokens,
                age_s,
                self.max_model_len,
            )

    def open_ended_load(self) -> OpenEndedLoad:
        """A snapshot of the unfinished requests without ``max_tokens``; safe to call from
        another thread than the one stepping (it reads a copy of the request list)."""
        now = time.monotonic()
        open_ended = [
            state.request
            for state in list(self._states.values())
            if state.request.sampling_params.max_tokens is None
        ]
        return OpenEndedLoad(
            len(open_ended),
            max((r.num_output_tokens for r in open_ended), default=0),
            max((now - r.arrival_time for r in open_ended), default=0.0),
        )

    # -- lower tiers and pins (see ``engine.offload_manager``) ---------------------------------

    @property
    def kv_store(self) -> KVStore | None:
        """The lower-tier store (for health and stats: writes may still be in flight; see
        ``OffloadManager.readable_store``)."""
        return self.offload.store

    def attach_kv_store(self, kv_store: KVStore | None) -> None:
        """Set (or remove) the lower-tier store, after the writes to the previous one landed;
        stores key blocks by ``self.fingerprint``."""
        self.offload.readable_store()
        self.offload.store = kv_store

    def pin_tokens(self, owner_id: str, token_ids: list[int], cache_salt: str = "") -> int:
        """Keep the device-cached full blocks of ``token_ids`` for ``owner_id`` (replacing its
        previous pin) until ``unpin``/``offload_pin`` or memory pressure; returns tokens pinned."""
        return self.offload.pin_tokens(owner_id, token_ids, cache_salt)

    def unpin(self, owner_id: str) -> None:
        """Release the owner's pin; its blocks stay cached until the pool evicts them."""
        self.offload.unpin(owner_id)

    def offload_pin(self, owner_id: str) -> None:
        """Write the owner's pinned blocks to the store (if any), then release the pin."""
        self.offload.offload_pin(owner_id)

    def is_pinned(self, owner_id: str) -> bool:
        """Whether ``owner_id`` still holds a pin (memory pressure may have released it)."""
        return self.offload.is_pinned(owner_id)

    def pinned_owner_ids(self) -> list[str]:
        """Owners holding a pin, least recently pinned first."""
        return list(self.offload.pins)

    def save_tokens(self, token_ids: list[int], cache_salt: str = "") -> int:
        """Write the device-cached full blocks of ``token_ids`` to the store; returns tokens."""
        return self.offload.save_tokens(token_ids, cache_salt)

    def cached_tokens(self, token_ids: list[int], cache_salt: str = "") -> tuple[int, int]:
        """(tokens of ``token_ids`` cached on the device, tokens then held by the store)."""
        return self.offload.cached_tokens(token_ids, cache_salt)

    @property
    def num_restored_tokens(self) -> int:
        """Tokens brought back from the store instead of recomputed, since start."""
        return self.offload.num_restored_tokens

    @property
    def num_saved_tokens(self) -> int:
        """Tokens written to the store, since start."""
        return self.offload.num_saved_tokens

    # -- pool --------------------------------------------------------------------------------

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_manager.num_blocks

    def kv_usage(self) -> float:
        """Fraction of the device pool's blocks referenced by requests or pins."""
        return self.kv_manager.usage()

    def close(self) -> None:
        """Finish the KV transfers in flight and end the transfer thread (so nothing keeps the
        KV cache alive once the engine is dropped). Transfers after it run inline."""
        self.offload.close()

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block (benchmarks and tests)."""
        self.kv_manager.reset_prefix_cache()

    # -- statistics (for the inspector page and metrics) ----------------------------------------

    def block_hashes_of(self, token_ids: list[int], cache_salt: str = "") -> list[BlockHash]:
        """Content hashes of the full blocks of ``token_ids``. Pure (reads no mutable engine
        state), so it may run on any thread without the step lock."""
        return self.kv_manager.hashes_for_tokens(token_ids, cache_salt)

    def num_device_blocks(self, block_hashes: list[BlockHash]) -> int:
        """How many leading ``block_hashes`` are cached on the device (by hash only; for
        reporting). Call while no step runs (``AsyncEngine.run_exclusive``); O(len)."""
        return self.kv_manager.num_cached_leading_blocks(block_hashes)

    def pool_stats(self) -> PoolStats:
        """The device pool by block use, and cumulative cache counters. O(1); call while no
        step runs (``AsyncEngine.run_exclusive``) for a consistent view."""
        manager, pool = self.kv_manager, self.kv_manager.pool
        num_free = pool.num_free_blocks
        num_pinned = self.offload.num_pinned_blocks
        return PoolStats(
            block_size=self.config.block_size,
            num_blocks=pool.num_blocks,
            num_empty_blocks=num_free - pool.num_cached_free_blocks,
            num_cached_blocks=pool.num_cached_free_blocks,
            num_pinned_blocks=num_pinned,
            num_in_use_blocks=pool.num_blocks - num_free - num_pinned,
            num_running_requests=len(self.scheduler.running),
            num_waiting_requests=len(self.scheduler.waiting) + len(self.scheduler.loading),
            prefix_query_tokens=manager.num_prefix_queries,
            prefix_hit_tokens=manager.num_prefix_hits,
            restored_tokens=self.num_restored_tokens,
            saved_tokens=self.num_saved_tokens,
            num_evictions=pool.num_evictions,
            num_pins_reclaimed=self.offload.num_pins_reclaimed,
            num_steps=self.num_steps,
        )

    # -- conveniences ------------------------------------------------------------------------

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Run prompts to completion; one aggregated output per prompt, in order."""
        ids = [f"generate-{self.num_steps}-{idx}" for idx in range(len(prompts))]
        for request_id, prompt in zip(ids, prompts, strict=True):
            self.add_request(request_id, prompt, params)
        merged: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                merged[out.request_id] = merge_outputs(merged.get(out.request_id), out)
        return [merged[request_id] for request_id in ids]

    def check_integrity(self) -> None:
        self.scheduler.check_integrity(self.offload.held_block_lists())
        self.offload.check_integrity()
        scheduler = self.scheduler
        live = {r.request_id for r in (*scheduler.running, *scheduler.waiting, *scheduler.loading)}
        assert live == set(self._states), "engine request states drifted from the scheduler"


def merge_outputs(previous: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a delta into the accumulated output of the same request."""
    if previous is None:
        return RequestOutput(**{f: getattr(delta, f) for f in RequestOutput.__slots__})
    previous.new_token_ids = previous.new_token_ids + delta.new_token_ids
    previous.new_text += delta.new_text
    if delta.logprobs is not None:
        previous.logprobs = (previous.logprobs or []) + delta.logprobs
    for name in ("finished", "finish_reason", "stop_reason", "num_output_tokens", "error"):
        setattr(previous, name, getattr(delta, name))
    return previous
