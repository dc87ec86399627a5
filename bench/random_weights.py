"""Write a model directory with a given config and tokenizer but freshly random weights.

    python -m bench.random_weights SOURCE_DIR TARGET_DIR [--dtype bfloat16]

``SOURCE_DIR`` needs only ``config.json`` and the tokenizer files. Decode speed does not depend
on the weights' values, so a GPU machine that cannot receive the embedded model (its GGUF is
larger than what travels there) still measures SmolLM2-135M's shape: ``bench/gpu_check.sh``
does this. Nothing here is used for correctness checks.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write_random_model(source: Path, target: Path, dtype: torch.dtype) -> Path:
    """Save ``AutoModelForCausalLM.from_config(source config)`` (seed 0) plus the tokenizer
    files found in ``source`` to ``target``; returns ``target``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(source))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    path = write_random_model(args.source, args.target, getattr(torch, args.dtype))
    print(f"random-weight model written to {path}")


if __name__ == "__main__":
    main()
