"""Runs one packed forward pass of a Hugging Face causal LM over the paged KV pool.

The KV pool is one tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``
(layout ``"LKBTHD"``): swapping a block to another tier moves index ``[:, :, block_id]``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from engine.attention import register_paged_attention
from engine.model_loader import LoadedModel

KV_LAYOUT = "LKBTHD"


class SeqChunk(NamedTuple):
    """The tokens of one sequence computed in this step."""

    token_ids: list[int]  # the new tokens
    start_pos: int  # absolute position of token_ids[0] (= tokens already in the pool)
    block_ids: list[int]  # the sequence's block table (covers start_pos + len(token_ids))
    needs_logits: bool  # True when the last new token's next-token logits are wanted


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
        self.device = loaded.device
        self.block_size = block_size
        self.kv_shape = kv_shape_of(self.model.config)
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
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()

    @torch.inference_mode()
    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Compute K/V for every chunk's tokens; return float32 logits ``[num_wanted, vocab]``
        for the chunks with ``needs_logits``, in chunk order."""
        metadata, input_ids, position_ids = self._prepare(chunks)
        hidden = self.decoder(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, **metadata
        ).last_hidden_state[0]  # [num_tokens, hidden_size]
        ends = metadata["query_start_loc"][1:] - 1
        wanted = torch.tensor([c.needs_logits for c in chunks], device=self.device)
        return self.lm_head(hidden[ends[wanted].long()]).float()

    def _prepare(
        self, chunks: list[SeqChunk]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        device, block_size = self.device, self.block_size
        num_seqs = len(chunks)
        q_lens = [len(c.token_ids) for c in chunks]
        max_blocks = max(len(c.block_ids) for c in chunks)
        block_tables = torch.zeros((num_seqs, max_blocks), dtype=torch.int32)
        for seq_idx, chunk in enumerate(chunks):
            block_tables[seq_idx, : len(chunk.block_ids)] = torch.tensor(chunk.block_ids)
        positions = torch.cat(
            [
                torch.arange(c.start_pos, c.start_pos + n)
                for c, n in zip(chunks, q_lens, strict=True)
            ]
        )
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), torch.tensor(q_lens))
        slot_mapping = (
            block_tables[seq_of_token, positions // block_size].long() * block_size
            + positions % block_size
        )
        query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32)
        query_start_loc[1:] = torch.cumsum(torch.tensor(q_lens), 0)
        seq_lens = torch.tensor(
            [c.start_pos + n for c, n in zip(chunks, q_lens, strict=True)], dtype=torch.int32
        )
        token_ids = [t for c in chunks for t in c.token_ids]
        metadata = {
            "kv_cache": self.kv_cache,
            "slot_mapping": slot_mapping.to(device),
            "block_tables": block_tables.to(device),
            "seq_lens": seq_lens.to(device),
            "query_start_loc": query_start_loc.to(device),
        }
        input_ids = torch.tensor([token_ids], device=device)
        return metadata, input_ids, positions.unsqueeze(0).to(device)
