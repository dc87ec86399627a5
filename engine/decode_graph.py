"""The graph-safe decode step: static, bucket-padded inputs, one forward per bucket; on CUDA
replayed from a captured CUDA graph.

Why: on a GPU a small decode step is bound by the host (transformers' eager modules and the
Python around every kernel launch), not by the GPU. A CUDA graph replays a whole step's
kernels from one host call, but only if every step of that shape uses the same memory, the same
launch arguments and no host sync. So a pure-decode step (``decode_inputs.is_pure_decode``) is
padded up to a bucket (``decode_inputs.decode_buckets``) and run over preallocated device
buffers sized for the largest bucket::

    host (numpy, pinned on CUDA)          device (static)                       per bucket b
    longs [3, max_bs] ids/pos/slots  -->  longs[:, :b]        one copy          input_ids, ...
    ints  [max_bs + max_bs * width]  -->  ints[:max_bs + b * width]  one copy   seq_lens,
                                          query_start_loc = 0, 1, 2, ... (never changes)  tables

then the bucket's forward (decoder + LM head) runs, as a graph replay or eagerly. Padded lanes
are harmless: slot ``-1`` (the KV store skips them) and length 0 (attention reads no key). The
attention metadata of a bucket (``ops.plan_attention``: checks, split-KV factor, scratch) is
planned once on CUDA, from shapes alone, with block tables at full width
(``ceil(max_model_len / block_size)``), so nothing inside the forward depends on the step.

On the CPU the same buffers and padded forward run eagerly (no graphs), with attention planned
per step for the real lanes only: the CPU attention kernel does not take length-0 rows, so the
padding rows skip attention (``PagedAttentionMetadata.num_real_tokens``).

Contract: ``run`` returns float32 logits ``[num_seqs, vocab]`` that stay valid until the next
``run`` (on CUDA with graphs they are a view of a static buffer the next replay overwrites);
the engine samples from them right after. Not thread-safe; one stream.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention import PagedAttentionMetadata
from engine.config import EngineConfig
from engine.decode_inputs import (
    PAD_SLOT,
    DecodeHostBuffers,
    blocks_needed,
    bucket_for,
    decode_buckets,
    fill_decode_inputs,
    is_pure_decode,
)
from engine.step_inputs import SeqChunk
from kernels import ops
from kernels.units import cdiv

logger = logging.getLogger(__name__)

# Submodules of a decoder layer that torch.compile may take: no attention inside, so no
# custom kernel or per-step object for it to trace (the attention stays eager between them).
COMPILED_LAYER_MODULES = ("input_layernorm", "post_attention_layernorm", "mlp")
NUM_WARMUP_RUNS = 2  # eager runs of a bucket before capture: Triton compiles, cuBLAS picks


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """How decode steps run; made from the engine's config and context limit."""

    max_num_seqs: int  # the largest bucket
    max_model_len: int  # sets the block tables' width
    cuda_graphs: bool = True  # capture a CUDA graph per bucket (CUDA only)
    compile_backend: str | None = None  # torch.compile the norms and MLPs with this backend

    @classmethod
    def from_config(cls, config: EngineConfig, max_model_len: int) -> DecodeOptions:
        return cls(
            max_num_seqs=config.max_num_seqs,
            max_model_len=max_model_len,
            cuda_graphs=not config.enforce_eager,
            compile_backend=config.compile_backend,
        )


class DecodeRunner:
    """Runs pure-decode steps of one model over static, bucket-padded inputs."""

    def __init__(
        self,
        decoder: torch.nn.Module,  # the HF base model: (input_ids, position_ids) -> hidden
        lm_head: torch.nn.Module,
        layer_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        num_heads: int,
        block_size: int,
        options: DecodeOptions,
    ) -> None:
        self.decoder = decoder
        self.lm_head = lm_head
        self.layer_caches = layer_caches
        self.num_heads = num_heads
        self.block_size = block_size
        self.device = layer_caches[0][0].device
        self.buckets = decode_buckets(options.max_num_seqs)
        self.max_num_seqs = self.buckets[-1]
        self.width = cdiv(options.max_model_len, block_size)  # max_blocks_per_seq
        on_cuda = self.device.type == "cuda"
        longs_host = torch.zeros((3, self.max_num_seqs), dtype=torch.int64, pin_memory=on_cuda)
        ints_host = torch.zeros(
            self.max_num_seqs * (1 + self.width), dtype=torch.int32, pin_memory=on_cuda
        )
        longs_host[2] = PAD_SLOT
        self.host = DecodeHostBuffers(
            longs=longs_host.numpy(),
            seq_lens=ints_host[: self.max_num_seqs].numpy(),
            block_tables=ints_host[self.max_num_seqs :].view(self.max_num_seqs, -1).numpy(),
        )
        self._longs_host, self._ints_host = longs_host, ints_host
        # On the CPU the "device" buffers are the host arrays themselves (no copy).
        self.longs = longs_host.to(self.device) if on_cuda else longs_host  # [3, max_bs]
        self.ints = ints_host.to(self.device) if on_cuda else ints_host
        self.seq_lens = self.ints[: self.max_num_seqs]  # [max_bs] int32
        self.block_tables = self.ints[self.max_num_seqs :].view(self.max_num_seqs, -1)
        self.query_start_loc = torch.arange(
            self.max_num_seqs + 1, dtype=torch.int32, device=self.device
        )  # every lane is one query token, padding included
        # Set after each upload: the host arrays are not rewritten before it has completed.
        self._uploaded = torch.cuda.Event() if on_cuda else None
        self._plans: dict[int, PagedAttentionMetadata] = {}  # CUDA: per bucket, made once
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_runs_by_bucket: dict[int, int] = dict.fromkeys(self.buckets, 0)
        self.logits: torch.Tensor | None = None  # [max_bs, vocab] f32: the graphs' output
        if options.compile_backend is not None:
            compile_modules(decoder, options.compile_backend)
        if on_cuda and options.cuda_graphs:
            self.capture()

    # -- per step -----------------------------------------------------------------------------

    def fits(self, chunks: list[SeqChunk]) -> bool:
        """Whether this step can run here: pure decode, a bucket holds it, tables fit."""
        return (
            0 < len(chunks) <= self.max_num_seqs
            and is_pure_decode(chunks)
            and blocks_needed(chunks, self.block_size) <= self.width
        )

    def run(self, chunks: list[SeqChunk]) -> torch.Tensor:  # [num_seqs, vocab] f32
        """One decode step (``fits(chunks)`` must hold): write the K/V of each chunk's token,
        return next-token logits. Does not wait for the device."""
        num_seqs = len(chunks)
        bucket = bucket_for(self.buckets, num_seqs)
        assert bucket is not None, "run() needs fits(chunks)"
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the previous upload has read the host arrays
        num_blocks = fill_decode_inputs(chunks, self.block_size, bucket, self.host)
        self._upload(bucket)
        self.num_runs_by_bucket[bucket] += 1
        graph = self.graphs.get(bucket)
        if graph is not None:
            assert self.logits is not None
            graph.replay()
            return self.logits[:num_seqs]
        metadata = self._metadata(bucket, num_seqs, num_blocks)
        hidden = self._forward(bucket, metadata)
        return self.lm_head(hidden[:num_seqs]).float()

    def _upload(self, bucket: int) -> None:
        """Copy the filled host arrays into the static device buffers (CUDA; one stream)."""
        if self._uploaded is None:
            return
        self.longs.copy_(self._longs_host, non_blocking=True)
        num_ints = self.max_num_seqs + bucket * self.width
        self.ints[:num_ints].copy_(self._ints_host[:num_ints], non_blocking=True)
        self._uploaded.record()

    def _metadata(self, bucket: int, num_seqs: int, num_blocks: int) -> PagedAttentionMetadata:
        """The attention metadata of a ``bucket`` step with ``num_seqs`` real lanes.

        CUDA: the bucket's plan over all its lanes at full table width, made once (only shapes
        go into it). CPU: planned for this step's real lanes and needed width (the CPU plan
        reads the lengths; padding rows then skip attention).
        """
        if self.device.type == "cuda":
            metadata = self._plans.get(bucket)
            if metadata is None:
                metadata = self._plans[bucket] = self._plan(bucket, bucket, self.width)
            return metadata
        return self._plan(bucket, num_seqs, num_blocks)

    def _plan(self, bucket: int, num_seqs: int, num_blocks: int) -> PagedAttentionMetadata:
        batch = ops.plan_attention(
            self.num_heads,
            self.layer_caches[0][0],
            self.longs[2, :bucket],
            self.block_tables[:num_seqs, :num_blocks],
            self.seq_lens[:num_seqs],
            self.query_start_loc[: num_seqs + 1],
        )
        num_real = None if num_seqs == bucket else num_seqs
        return PagedAttentionMetadata(self.layer_caches, batch, num_real_tokens=num_real)

    def _forward(
        self, bucket: int, metadata: PagedAttentionMetadata
    ) -> torch.Tensor:  # [bucket, hidden_size]
        return self.decoder(
            input_ids=self.longs[0, :bucket].unsqueeze(0),
            position_ids=self.longs[1, :bucket].unsqueeze(0),
            use_cache=False,
            paged_metadata=metadata,
        ).last_hidden_state[0]

    # -- CUDA graphs --------------------------------------------------------------------------

    def capture(self) -> None:
        """Capture one CUDA graph per bucket, largest first, all in one memory pool.

        Each bucket is first run eagerly (Triton compiles its kernels, cuBLAS and torch.compile
        settle) over padding lanes only, which write and read no KV. The graphs write their
        logits into one static ``[max_num_seqs, vocab]`` float32 buffer. If a capture fails
        (a model whose forward syncs with the host, say), no graph is kept and every decode
        step runs eagerly; the failure is logged.
        """
        self._reset_lanes()
        weight = self.lm_head.weight
        assert isinstance(weight, torch.Tensor)
        vocab_size = int(weight.shape[0])  # nn.Linear weight: [vocab, hidden]
        self.logits = torch.zeros(
            (self.max_num_seqs, vocab_size), dtype=torch.float32, device=self.device
        )
        pool = torch.cuda.graph_pool_handle()
        try:
            for bucket in reversed(self.buckets):
                metadata = self._metadata(bucket, bucket, self.width)
                for _ in range(NUM_WARMUP_RUNS):
                    self._forward_into_logits(bucket, metadata)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward_into_logits(bucket, metadata)
                self.graphs[bucket] = graph
            torch.cuda.synchronize(self.device)
        except RuntimeError:
            logger.exception("CUDA graph capture failed; decode steps run eagerly")
            self.graphs.clear()
            self.logits = None

    def _forward_into_logits(self, bucket: int, metadata: PagedAttentionMetadata) -> None:
        assert self.logits is not None
        hidden = self._forward(bucket, metadata)
        self.logits[:bucket].copy_(self.lm_head(hidden))

    def _reset_lanes(self) -> None:
        """Make every lane padding (slot -1, length 0) on the host and the device."""
        self.host.longs[:2] = 0
        self.host.longs[2] = PAD_SLOT
        self.host.seq_lens[:] = 0
        self.host.block_tables[:] = 0
        self.longs.copy_(self._longs_host)
        self.ints.copy_(self._ints_host)

    def replay_gpu_ms(self, bucket: int, num_replays: int = 20) -> float:
        """Mean GPU time of one replay of ``bucket``'s graph in milliseconds (benchmarks: the
        host time of a step is its wall time minus this). Replays over the current buffers,
        which rewrites the last step's K/V with the same values."""
        graph = self.graphs[bucket]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(num_replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / num_replays


def compile_modules(decoder: torch.nn.Module, backend: str) -> None:
    """``torch.compile`` (in place) each decoder layer's norms and MLP, and the final norm.

    The attention stays eager: it launches our kernels with a per-step plan. ``dynamic=True``
    makes one compiled graph serve every batch size (and prefill lengths), so buckets do not
    recompile one by one. Each module's ``forward`` is compiled (not ``Module.__call__``): the
    compiled code is cached per class's ``forward``, so all layers' norms share one entry and
    the MLPs another, well under dynamo's recompile limit.
    """
    modules = [getattr(decoder, "norm", None)]
    for layer in getattr(decoder, "layers", []):
        modules += [getattr(layer, name, None) for name in COMPILED_LAYER_MODULES]
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.forward = torch.compile(module.forward, backend=backend, dynamic=True)
