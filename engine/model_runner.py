"""Runs one packed forward pass of a Hugging Face causal LM over the paged KV pool.

The KV pool is one tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``
(layout ``"LKBTHD"``): swapping a block to another tier moves index ``[:, :, block_id]``.

A step's host work is kept small because on a GPU it, not the GPU, bounds decode speed: the
batch is packed with numpy (``engine.step_inputs``), moved to the device in two copies (pinned,
non-blocking on CUDA), and the attention metadata is planned once for all layers. Pure-decode
steps go through ``engine.decode_graph`` once ``setup_decode`` has run: static bucket-padded
inputs and, on CUDA, one captured CUDA graph per bucket.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from engine.attention import PagedAttentionMetadata, register_paged_attention
from engine.decode_graph import DecodeOptions, DecodeRunner
from engine.model_loader import LoadedModel
from engine.step_inputs import SeqChunk, pack_chunks
from kernels import ops
from kernels.cpu_linear import install_rows_linears

KV_LAYOUT = "LKBTHD"


class StepInputs(NamedTuple):
    """One step's inputs on the device."""

    input_ids: torch.Tensor  # [1, num_tokens] int64
    position_ids: torch.Tensor  # [1, num_tokens] int64
    logits_indices: torch.Tensor | None  # [num_wanted] int64; None: every token is wanted
    metadata: PagedAttentionMetadata


class KVShape(NamedTuple):
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * element_size


def kv_shape_of(config: Any) -> KVShape:
    """Layer count, KV heads and head size of a transformers text config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    return KVShape(config.num_hidden_layers, num_kv_heads, head_dim)


class ModelRunner:
    """Owns the model's KV pool and turns ``SeqChunk`` batches into next-token logits."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.model.set_attn_implementation(register_paged_attention())
        if loaded.device.type == "cpu":  # decode steps' few rows: see kernels.cpu_linear
            install_rows_linears(self.model)
        self.device = loaded.device
        self.block_size = block_size
        self.kv_shape = kv_shape_of(self.model.config)
        self.num_heads = _num_attention_heads(self.model.config)
        self.kv_cache = torch.zeros(
            (
                self.kv_shape.num_layers,
                2,
                num_blocks,
                block_size,
                self.kv_shape.num_kv_heads,
                self.kv_shape.head_dim,
            ),
            dtype=loaded.dtype,
            device=self.device,
        )
        # Per-layer (key, value) cache views, made once instead of in every layer's call.
        self.layer_caches = [(layer[0], layer[1]) for layer in self.kv_cache]
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        self.decode: DecodeRunner | None = None  # set by setup_decode

    @torch.inference_mode()
    def setup_decode(self, options: DecodeOptions) -> None:
        """Route pure-decode steps through static bucket-padded inputs from now on; on CUDA
        (unless ``options.cuda_graphs`` is off) capture their CUDA graphs here (seconds)."""
        self.decode = DecodeRunner(
            self.decoder,
            self.lm_head,
            self.layer_caches,
            self.num_heads,
            self.block_size,
            options,
        )

    @torch.inference_mode()
    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Compute K/V for every chunk's tokens; return float32 logits ``[num_wanted, vocab]``
        for the chunks with ``needs_logits``, in chunk order. Does not wait for the device.

        The logits are valid until the next ``execute`` (a decode graph's output buffer).
        """
        if self.decode is not None and self.decode.fits(chunks):
            return self.decode.run(chunks)
        inputs = self._prepare(chunks)
        hidden = self.decoder(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            use_cache=False,
            paged_metadata=inputs.metadata,
        ).last_hidden_state[0]  # [num_tokens, hidden_size]
        if inputs.logits_indices is not None:
            hidden = hidden.index_select(0, inputs.logits_indices)
        return self.lm_head(hidden).float()

    def _prepare(self, chunks: list[SeqChunk]) -> StepInputs:
        """Pack the chunks on the host, copy them over, plan attention for all layers."""
        host = pack_chunks(chunks, self.block_size)
        num_tokens, num_seqs = host.num_tokens, len(chunks)
        longs = self._upload(
            np.concatenate([host.input_ids, host.positions, host.slot_mapping, host.logits_indices])
        )
        ints = self._upload(
            np.concatenate([host.query_start_loc, host.seq_lens, host.block_tables.ravel()])
        )
        slot_mapping = longs[2 * num_tokens : 3 * num_tokens]
        block_tables = ints[2 * num_seqs + 1 :].view(num_seqs, -1)
        seq_lens = ints[num_seqs + 1 : 2 * num_seqs + 1]
        query_start_loc = ints[: num_seqs + 1]
        batch = ops.plan_attention(
            self.num_heads,
            self.layer_caches[0][0],
            slot_mapping,
            block_tables,
            seq_lens,
            query_start_loc,
        )
        all_wanted = host.logits_indices.shape[0] == num_tokens  # e.g. a decode-only step
        return StepInputs(
            input_ids=longs[:num_tokens].unsqueeze(0),
            position_ids=longs[num_tokens : 2 * num_tokens].unsqueeze(0),
            logits_indices=None if all_wanted else longs[3 * num_tokens :],
            metadata=PagedAttentionMetadata(self.layer_caches, batch),
        )

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """A host array on the model's device: one pinned, non-blocking copy on CUDA.

        The pinned staging memory comes from torch's caching host allocator, which does not
        hand it out again before the copy has finished.
        """
        tensor = torch.from_numpy(array)
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)


def _num_attention_heads(config: Any) -> int:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.num_attention_heads)
