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

from engine.block_pool import BlockHash, KVBlock
from engine.config import EngineConfig, GiB
from engine.detokenizer import IncrementalDetokenizer, TextOutput
from engine.errors import InvalidRequestError
from engine.fingerprint import model_fingerprint
from engine.kv_cache_manager import KVCacheManager
from engine.kv_store import KVStore
from engine.model_loader import LoadedModel
from engine.model_runner import KV_LAYOUT, ModelRunner, kv_shape_of
from engine.outputs import RequestOutput, TokenLogprob
from engine.request import Request, RequestStatus
from engine.sampler import SamplingRow, sample
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.step_inputs import SeqChunk
from kernels import ops

logger = logging.getLogger(__name__)
OPEN_ENDED_LOG_EVERY = 1024  # log an open-ended request's progress every this many tokens


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
    detokenizer: IncrementalDetokenizer
    text: TextOutput
    generator: torch.Generator | None


class LLMEngine:
    """Owns the model runner, KV cache manager and scheduler for one model.

    With a ``kv_store`` (host memory / Redis tiers), waiting requests first restore the blocks
    of their prefix that the store holds (so they are not recomputed), preempted requests
    swap their full blocks out to it, and pinned contexts are offloaded to it before their
    pins are released under memory pressure.
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
        self.runner = ModelRunner(loaded, num_blocks, block_size)
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
        self.kv_store = kv_store
        self.scheduler = Scheduler(
            self.kv_manager,
            self.config.max_num_batched_tokens,
            self.config.max_num_seqs,
            reclaim=self._reclaim_pins,
            on_preempt=self._swap_out,
        )
        self.num_restored_tokens = 0  # tokens brought back from the store instead of recomputed
        self.num_saved_tokens = 0  # tokens written to the store
        self.num_pins_reclaimed = 0
        self.num_open_ended_requests = 0  # admitted without max_tokens, since start
        model_max = getattr(loaded.config, "max_position_embeddings", None) or 1 << 30
        self.max_model_len = min(
            self.config.max_model_len or model_max, model_max, num_blocks * block_size
        )
        self.eos_token_ids = loaded.eos_token_ids()
        self.vocab_size = int(loaded.config.vocab_size)
        self._states: dict[str, _RequestState] = {}
        self._pinned_tokens: dict[str, tuple[list[int], str]] = {}
        self.num_steps = 0

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
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        self._states[request_id] = _RequestState(
            request,
            IncrementalDetokenizer(self.tokenizer, token_ids),
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
        prefetch_pins = self._restore_waiting_prefixes()
        schedule = self.scheduler.schedule()
        self.kv_manager.pool.free(prefetch_pins)
        if not schedule.scheduled:
            return []
        chunks = [
            SeqChunk(
                token_ids=request.all_token_ids[
                    request.num_computed_tokens : request.num_computed_tokens + num_new
                ],
                start_pos=request.num_computed_tokens,
                block_ids=self.kv_manager.get_block_ids(request.request_id),
                needs_logits=request.num_computed_tokens + num_new == request.num_tokens,
            )
            for request, num_new in schedule.scheduled
        ]
        logits = self.runner.execute(chunks)
        to_sample = self.scheduler.update_after_step(schedule)
        rows = [self._sampling_row(request) for request in to_sample]
        outputs = [
            self._process_token(request, token_id, logprob)
            for request, (token_id, logprob) in zip(to_sample, sample(logits, rows), strict=True)
        ]
        self.num_steps += 1
        if self.config.check_integrity:
            self.check_integrity()
        return outputs

    def _sampling_row(self, request: Request) -> SamplingRow:
        params = request.sampling_params
        banned: list[int] = []
        if request.num_output_tokens < params.min_tokens:
            banned = sorted({*request.eos_token_ids, *params.stop_token_ids})
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

    def attach_kv_store(self, kv_store: KVStore | None) -> None:
        """Set (or remove) the lower-tier store; stores key blocks by ``self.fingerprint``."""
        self.kv_store = kv_store

    # -- lower tiers ---------------------------------------------------------------------------

    def _restore_waiting_prefixes(self) -> list[KVBlock]:
        """Load store-held prefix blocks of the requests about to be admitted into the pool.

        The loaded blocks are cached and referenced until the caller frees the returned list
        (right after scheduling), so admission finds them as ordinary prefix hits.
        """
        if self.kv_store is None:
            return []
        free_slots = self.config.max_num_seqs - len(self.scheduler.running)
        pins: list[KVBlock] = []
        for request in list(self.scheduler.waiting)[: max(0, free_slots)]:
            pins += self._restore_prefix(request)
        return pins

    def _restore_prefix(self, request: Request) -> list[KVBlock]:
        assert self.kv_store is not None
        block_size = self.config.block_size
        max_blocks = (request.num_tokens - 1) // block_size
        hashes = self.kv_manager.block_hashes(request)[:max_blocks]
        start = len(self.kv_manager.cached_prefix(request.all_token_ids, hashes))
        num_blocks = self.kv_store.lookup(hashes[start:])
        if num_blocks > self.kv_manager.num_free_blocks:
            self._reclaim_pins(num_blocks)  # paused contexts make room for a resuming one
        num_blocks = min(num_blocks, self.kv_manager.num_free_blocks)
        if num_blocks == 0:
            return []
        tokens = [
            request.all_token_ids[idx * block_size : (idx + 1) * block_size]
            for idx in range(start, start + num_blocks)
        ]
        staged = self.kv_store.load(hashes[start : start + num_blocks], tokens)
        if staged is None:
            return []
        blocks = self.kv_manager.pool.allocate(num_blocks)
        assert blocks is not None
        block_ids = torch.tensor([block.block_id for block in blocks])
        ops.scatter_blocks(self.runner.kv_cache, block_ids, staged)
        for block, block_hash, block_tokens in zip(
            blocks, hashes[start : start + num_blocks], tokens, strict=True
        ):
            self.kv_manager.pool.cache_block(block, block_hash, block_tokens)
        request.num_restored_tokens += num_blocks * block_size
        self.num_restored_tokens += num_blocks * block_size
        return blocks

    def _save_blocks(
        self, blocks: list[KVBlock], hashes: list[BlockHash], token_ids: list[int]
    ) -> None:
        """Write device blocks (the full blocks of ``token_ids``) to the store, skipping the
        leading ones it already holds."""
        if self.kv_store is None or not blocks:
            return
        skip = self.kv_store.lookup(hashes[: len(blocks)])
        blocks, hashes = blocks[skip:], hashes[skip : len(blocks)]
        if not blocks:
            return
        block_size = self.config.block_size
        tokens = [
            token_ids[(skip + i) * block_size : (skip + i + 1) * block_size]
            for i in range(len(blocks))
        ]
        block_ids = torch.tensor([block.block_id for block in blocks])
        staged = ops.gather_blocks(self.runner.kv_cache, block_ids).cpu()
        self.kv_store.save(hashes, tokens, staged)
        self.num_saved_tokens += len(blocks) * block_size

    def _swap_out(self, request: Request) -> None:
        """Before a preempted request's blocks are freed: keep its full blocks in the store."""
        num_full = request.num_computed_tokens // self.config.block_size
        table = self.kv_manager.block_tables.get(request.request_id, [])[:num_full]
        self._save_blocks(table, self.kv_manager.block_hashes(request), request.all_token_ids)

    def _reclaim_pins(self, num_blocks_needed: int) -> bool:
        """Release pins, least recently pinned first, until ``num_blocks_needed`` blocks are
        free or no pin is left; pinned blocks go to the store first. True if any was released."""
        released = False
        while self.kv_manager.pins and self.kv_manager.num_free_blocks < num_blocks_needed:
            owner_id = next(iter(self.kv_manager.pins))
            self.offload_pin(owner_id)
            released = True
            self.num_pins_reclaimed += 1
        return released

    # -- pins: contexts kept on the device between requests (used by sessions) ----------------

    def pin_tokens(self, owner_id: str, token_ids: list[int], cache_salt: str = "") -> int:
        """Pin the device-cached full blocks of ``token_ids`` for ``owner_id`` (replacing its
        previous pin); returns how many tokens are pinned."""
        hashes = self.kv_manager.hashes_for_tokens(token_ids, cache_salt)
        blocks = self.kv_manager.cached_prefix(token_ids, hashes)
        self.kv_manager.pin(owner_id, blocks)
        self._pinned_tokens[owner_id] = (list(token_ids), cache_salt)
        return len(blocks) * self.config.block_size

    def unpin(self, owner_id: str) -> None:
        """Release the owner's pin; its blocks stay cached until the pool evicts them."""
        self.kv_manager.unpin(owner_id)
        self._pinned_tokens.pop(owner_id, None)

    def offload_pin(self, owner_id: str) -> None:
        """Write the owner's pinned blocks to the store (if any), then release the pin."""
        token_ids, cache_salt = self._pinned_tokens.get(owner_id, ([], ""))
        blocks = self.kv_manager.pins.get(owner_id, [])
        hashes = self.kv_manager.hashes_for_tokens(token_ids, cache_salt)
        self._save_blocks(list(blocks), hashes, token_ids)
        self.unpin(owner_id)

    def save_tokens(self, token_ids: list[int], cache_salt: str = "") -> int:
        """Write the device-cached full blocks of ``token_ids`` to the store; returns tokens."""
        hashes = self.kv_manager.hashes_for_tokens(token_ids, cache_salt)
        blocks = self.kv_manager.cached_prefix(token_ids, hashes)
        self._save_blocks(blocks, hashes, token_ids)
        return len(blocks) * self.config.block_size

    def cached_tokens(self, token_ids: list[int], cache_salt: str = "") -> tuple[int, int]:
        """(tokens of ``token_ids`` cached on the device, tokens then held by the store)."""
        hashes = self.kv_manager.hashes_for_tokens(token_ids, cache_salt)
        on_device = len(self.kv_manager.cached_prefix(token_ids, hashes))
        in_store = self.kv_store.lookup(hashes[on_device:]) if self.kv_store is not None else 0
        return on_device * self.config.block_size, in_store * self.config.block_size

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
        self.scheduler.check_integrity()
        live = {r.request_id for r in (*self.scheduler.running, *self.scheduler.waiting)}
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
