"""Engine settings, with defaults fit for the embedded model on a small CPU machine."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
# Drafts per step where num_speculative_tokens is None, by device type. On a CPU a decode step
# is memory-bound (weights and K/V streamed once per step), so verifying 3 drafts costs far
# less than 3 more steps; on CUDA the decode steps replay CUDA graphs, which a drafting step
# cannot (not measured there yet: off).
AUTO_SPECULATIVE_TOKENS = {"cpu": 3}
# Draft tokens per step at most: a step's query of 1 + drafts tokens must fit one run of the
# compiled CPU attention kernel (kernels.cpu_native.MAX_RUN).
MAX_SPECULATIVE_TOKENS = 7


@dataclass
class EngineConfig:
    """How big the KV pool is and how much work one step may carry.

    The pool is sized by ``num_kv_blocks`` if given, else by ``kv_cache_bytes`` (default 1 GiB
    on CPU; on CUDA ``gpu_memory_fraction`` of the memory free after loading the weights).
    """

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_fraction: float = 0.8
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 64
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    check_integrity: bool = False  # assert pool/scheduler invariants after every step (tests)
    # CUDA: no CUDA graphs for decode steps (they still run over padded static inputs).
    enforce_eager: bool = False
    # torch.compile the decoder's norms and MLPs with this backend ("inductor"); None: eager.
    compile_backend: str | None = None
    # Speculative decoding by prompt lookup: draft up to this many tokens per step for each
    # greedy request (engine.speculative); 0: off; None: by device (speculative_tokens_for).
    num_speculative_tokens: int | None = 0

    def validate(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}")
        for name in ("num_kv_blocks", "kv_cache_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        drafts = self.num_speculative_tokens
        if drafts is not None and not 0 <= drafts <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(
                f"num_speculative_tokens must be in 0..{MAX_SPECULATIVE_TOKENS}, "
                f"got {self.num_speculative_tokens}"
            )
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")

    def speculative_tokens_for(self, device_type: str) -> int:
        """Draft tokens per step on ``device_type`` ("cpu", "cuda")."""
        if self.num_speculative_tokens is not None:
            return self.num_speculative_tokens
        return AUTO_SPECULATIVE_TOKENS.get(device_type, 0)
