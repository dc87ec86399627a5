"""Does a second thread's torch copying slow the forward pass? (the KV transfer thread's case)

The main thread runs a 256-token forward of the embedded SmolLM2 in a loop; a second thread
copies 20 KV blocks (14.7 MB) every 50 ms, either with torch's default thread count or after
``torch.set_num_threads(1)`` on that thread (what ``engine.transfer_worker`` does). Prints the
mean forward time without and with the copier, and the main thread's thread count after.

    .venv/bin/python bench/transfer_thread_contention.py            # copier: default threads
    .venv/bin/python bench/transfer_thread_contention.py --one      # copier: one thread
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/transfer_thread_contention.py
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from engine.model_loader import load_model

NUM_FORWARDS = 15
COPY_EVERY_S = 0.05
SLAB_SHAPE = (30, 2, 200, 16, 3, 64)  # SmolLM2's layers, K/V, 200 blocks of 16 tokens
NUM_COPIED_BLOCKS = 20


def mean_forward_s(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(NUM_FORWARDS):
            model(input_ids=input_ids)
    return (time.perf_counter() - started) / NUM_FORWARDS


def copy_blocks_until(stop: threading.Event, one_thread: bool) -> None:
    if one_thread:
        torch.set_num_threads(1)
    slab = torch.empty(SLAB_SHAPE)
    blocks = torch.randn(*SLAB_SHAPE[:2], NUM_COPIED_BLOCKS, *SLAB_SHAPE[3:])
    while not stop.is_set():
        slab[:, :, :NUM_COPIED_BLOCKS].copy_(blocks)
        time.sleep(COPY_EVERY_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", action="store_true", help="the copier uses one thread")
    args = parser.parse_args()
    model = load_model(None, dtype="float32", device="cpu").model
    input_ids = torch.randint(0, 1000, (1, 256))
    mean_forward_s(model, input_ids)  # warm-up
    alone = mean_forward_s(model, input_ids)
    stop = threading.Event()
    copier = threading.Thread(target=copy_blocks_until, args=(stop, args.one))
    copier.start()
    beside = mean_forward_s(model, input_ids)
    stop.set()
    copier.join()
    print(f"forward alone {alone * 1000:.1f} ms; beside the copier {beside * 1000:.1f} ms")
    print(f"main thread's torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
