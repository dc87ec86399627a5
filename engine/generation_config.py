"""Default sampling values for requests that leave them unset, derived as vLLM derives them.

A request field that is absent (or null) takes the server's default; a field the request sets
always wins. The defaults come from one of (``--generation-config``):

* ``"auto"`` (default): the model's ``generation_config.json``, only the sampling keys it sets
  (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``,
  ``max_new_tokens``); for the embedded SmolLM2, whose converted cache carries none, the
  settings of its model card (``EMBEDDED_MODEL_GENERATION_CONFIG``);
* ``"vllm"`` / ``"none"``: no model defaults (temperature 1, no filters, no penalties);
* a directory holding a ``generation_config.json``.

``--override-generation-config`` (a JSON object with the same keys, plus ``max_tokens``,
``presence_penalty`` and ``frequency_penalty``) is merged on top in every mode. Without
``max_new_tokens`` / ``max_tokens`` the default output length is the rest of the context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

# generation_config.json key -> SamplingParams field (vLLM's list of honoured keys).
GENERATION_CONFIG_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
OVERRIDE_ONLY_KEYS = {
    "max_tokens": "max_tokens",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# SmolLM2-Instruct's model card samples with temperature 0.2, top_p 0.9 (its Hugging Face
# generation_config.json sets no sampling values). The embedded build (Q4_1 GGUF) is less
# sure of itself: for "What is the capital of France?" its first token is nearly a tie
# ("The" logprob -1.88, "L" -1.97), so at temperature 0.2 about a third of the answers start
# "L'..." and ramble on in French, often looping to the context limit. Greedy answers "The
# capital of France is Paris."; the card's top_p stays the default for requests that set a
# temperature.
EMBEDDED_MODEL_GENERATION_CONFIG: dict[str, Any] = {"temperature": 0.0, "top_p": 0.9}
NEUTRAL_MODES = ("vllm", "none")


def read_generation_config(model_dir: Path) -> dict[str, Any]:
    """The sampling keys set in ``model_dir/generation_config.json`` (as SamplingParams field
    names); {} when there is no such file. Raises ValueError on a malformed file."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return {
        field: config[key]
        for key, field in GENERATION_CONFIG_KEYS.items()
        if config.get(key) is not None
    }


def parse_override(text: str | None) -> dict[str, Any]:
    """``--override-generation-config`` JSON -> SamplingParams field values; raises ValueError
    naming an unknown key or malformed JSON."""
    if not text:
        return {}
    try:
        override = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--override-generation-config is not valid JSON: {exc}") from exc
    if not isinstance(override, dict):
        raise ValueError("--override-generation-config must be a JSON object")
    known = {**GENERATION_CONFIG_KEYS, **OVERRIDE_ONLY_KEYS}
    unknown = sorted(set(override) - set(known))
    if unknown:
        raise ValueError(
            f"--override-generation-config: unknown keys {unknown}; known: {sorted(known)}"
        )
    return {known[key]: value for key, value in override.items()}


def sampling_defaults(
    model_dir: Path,
    embedded: bool,
    mode: str = "auto",
    override: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The default SamplingParams field values for the model in ``model_dir`` (see the module
    docstring); ``embedded``: it is the embedded SmolLM2. Raises ValueError for an unknown
    mode, a directory without ``generation_config.json``, or values SamplingParams rejects."""
    if mode == "auto":
        defaults = dict(EMBEDDED_MODEL_GENERATION_CONFIG) if embedded else {}
        defaults.update(read_generation_config(model_dir))
    elif mode in NEUTRAL_MODES:
        defaults = {}
    else:
        directory = Path(mode).expanduser()
        if not (directory / "generation_config.json").is_file():
            raise ValueError(
                f"--generation-config must be auto, vllm, none or a directory holding "
                f"generation_config.json; got {mode!r}"
            )
        defaults = read_generation_config(directory)
    defaults.update(override or {})
    try:
        SamplingParams(**defaults).validate()
    except (TypeError, InvalidRequestError) as exc:
        raise ValueError(f"bad default sampling values {defaults}: {exc}") from exc
    return defaults


def describe(defaults: dict[str, Any]) -> str:
    """``temperature=0.2 top_p=0.9`` (or ``neutral``) for the startup log."""
    return " ".join(f"{k}={v}" for k, v in sorted(defaults.items())) or "neutral"
