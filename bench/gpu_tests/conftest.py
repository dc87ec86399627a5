"""The CPU suite's tiny-model fixtures, for the CUDA-only tests kept outside it."""

from tests.conftest import tiny_model_dirs, tiny_tokenizer  # noqa: F401  (pytest fixtures)
