"""The linear layers of a decode step on the CPU: torch's ``F.linear`` vs the compiled kernel.

    PYTHONPATH=. .venv/bin/python bench/cpu_linear_bench.py [--rows 1 2 4 8 16 32 64]

Times one pass over 30 layers of SmolLM2-135M's linear shapes (q, k, v, o, gate, up, down;
30 distinct weights each, 425 MB of float32, so every pass reads the weights from memory as a
real forward does), for each row count: the best of 3 rounds of 4 passes, ``F.linear`` and
``kernels.cpu_linear.small_rows_linear`` alternating. Checks that both agree first.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.cpu_linear import MAX_ROWS, MIN_ROWS, load_small_linear, small_rows_linear

# SmolLM2-135M: hidden 576, MLP 1536, 9 query heads and 3 KV heads of 64
LAYER_SHAPES = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
]
NUM_LAYERS = 30

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def torch_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def kernel_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return small_rows_linear(x, weight, None)


def one_pass_ms(fn: Linear, weights: list[torch.Tensor], num_rows: int) -> float:
    """Best of 3 rounds: ms for one pass over all weights with ``num_rows`` rows."""
    inputs = [torch.randn(num_rows, w.shape[1]) for w in weights]
    for w, x in zip(weights, inputs, strict=True):
        fn(x, w)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(4):
            for w, x in zip(weights, inputs, strict=True):
                fn(x, w)
        best = min(best, (time.perf_counter() - start) / 4 * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 12, 16, 24, 32, 48, 64]
    )
    args = parser.parse_args()
    if load_small_linear() is None:
        raise SystemExit("the compiled linear kernel could not be built here")
    torch.manual_seed(0)
    weights = [torch.randn(o, i) for _ in range(NUM_LAYERS) for o, i in LAYER_SHAPES]
    probe = torch.randn(8, 576)
    torch.testing.assert_close(
        kernel_linear(probe, weights[0]), torch_linear(probe, weights[0]), atol=1e-4, rtol=1e-5
    )
    print(
        f"torch threads {torch.get_num_threads()}; the engine uses the kernel for "
        f"{MIN_ROWS}-{MAX_ROWS} rows"
    )
    print("rows | F.linear ms | kernel ms | F.linear / kernel")
    for num_rows in args.rows:
        plain = one_pass_ms(torch_linear, weights, num_rows)
        kernel = one_pass_ms(kernel_linear, weights, num_rows)
        print(f"{num_rows:4d} | {plain:11.1f} | {kernel:9.1f} | {plain / kernel:.2f}x")


if __name__ == "__main__":
    main()
