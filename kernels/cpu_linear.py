"""``nn.Linear`` for the few rows of a decode step on the CPU (``csrc/small_linear.c``).

A decode step multiplies a handful of rows (one per sequence, padded to the decode bucket) by
every weight matrix of the model. With so few rows the layer should cost one read of its
weight, but torch's BLAS call re-packs the weight in every call: on SmolLM2-135M's shapes (2
cores, float32) the 30 layers' linears took ~21 ms for 1 row, ~64 ms for 8 and ~115 ms for 16;
the compiled kernel takes ~42 ms for 8 rows and ~55 ms for 16 (``bench/cpu_linear_bench.py``;
docs/BENCHMARKS.md, "Linear layers of a decode step"). One row (a matrix-vector product),
2-3 rows and more than ``MAX_ROWS`` rows (prefill chunks) stay with torch, which is as fast or
faster there.

``install_rows_linears(model)`` swaps every float32 CPU ``nn.Linear`` of a model for a
``RowsLinear`` that shares its weight and bias (state-dict keys and tied weights unchanged).
The kernel sums in another order than BLAS, so results differ from ``F.linear`` by float32
rounding, as BLAS results already differ between row counts. Where the kernel cannot be built
(no C compiler) or ``TARRY_NATIVE_LINEAR=0``, nothing is swapped.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels import native_build

SOURCE = native_build.CSRC / "small_linear.c"
# Rows (tokens of a step) that go to the kernel; others stay with torch (see the docstring).
MIN_ROWS, MAX_ROWS = 4, 32
# 512-bit vectors on x86 CPUs that have them (measured 10-25 % faster than gcc's default of
# 256 there; a CPU without AVX-512 keeps what it has).
_EXTRA_FLAGS = ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_ARGTYPES: list[Any] = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, ctypes.c_int]


@functools.lru_cache(maxsize=1)
def load_small_linear() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The compiled ``tarry_small_linear_f32``, building it on first use; ``None`` where it
    cannot be built or loaded (logged once). ``TARRY_NATIVE_LINEAR=0`` turns it off."""
    return native_build.load_function(
        SOURCE, "tarry_small_linear_f32", _ARGTYPES, "TARRY_NATIVE_LINEAR", _EXTRA_FLAGS
    )


def small_rows_linear(
    x: torch.Tensor,  # [..., in_features] float32, CPU
    weight: torch.Tensor,  # [out_features, in_features] float32, contiguous
    bias: torch.Tensor | None,  # [out_features] float32, contiguous
) -> torch.Tensor:  # [..., out_features]
    """``F.linear(x, weight, bias)`` by the compiled kernel (any number of rows, though it only
    pays off for ``MIN_ROWS..MAX_ROWS``). Raises ``RuntimeError`` when the kernel is not
    available or the tensors are not float32 CPU tensors of matching shapes."""
    function = load_small_linear()
    if function is None:
        raise RuntimeError("the compiled CPU linear kernel is not available")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features or (bias is not None and bias.shape != (out_features,)):
        raise RuntimeError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    for tensor in (x, weight, bias):
        if tensor is not None and (tensor.dtype != torch.float32 or tensor.device.type != "cpu"):
            raise RuntimeError("the compiled CPU linear takes float32 CPU tensors")
    if not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        raise RuntimeError("the compiled CPU linear reads a contiguous weight and bias")
    return _run(function, x, weight, bias)


def _run(
    function: ctypes._CFuncPtr,  # type: ignore[name-defined]
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The kernel call of ``small_rows_linear`` on tensors already checked (``RowsLinear``
    checks its weight and bias once, when it is installed)."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], out_features)
    if rows.stride(1) != 1 or rows.stride(0) < in_features:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], out_features)
    status = function(
        rows.data_ptr(),
        rows.stride(0),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows.shape[0],
        out_features,
        in_features,
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"the compiled CPU linear rejected the shapes (status {status})")
    return out.view(*x.shape[:-1], out_features)


class RowsLinear(nn.Module):
    """An ``nn.Linear`` (same weight and bias parameters, same state-dict keys) whose
    ``MIN_ROWS..MAX_ROWS``-row inputs go to the compiled kernel when no gradient is wanted;
    everything else is ``F.linear``. Made by ``install_rows_linears``, which checks the weight
    and bias (float32, CPU, contiguous) and that the kernel is available."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_rows = x.numel() // self.in_features if self.in_features else 0
        if (
            MIN_ROWS <= num_rows <= MAX_ROWS
            and x.shape[-1] == self.in_features  # else F.linear raises its usual error
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and self.weight.requires_grad)
        ):
            function = load_small_linear()  # cached; available, or nothing was installed
            return _run(function, x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def install_rows_linears(model: nn.Module) -> int:
    """Swap every float32 CPU ``nn.Linear`` (exactly that class, contiguous weight) of
    ``model`` for a ``RowsLinear``; returns how many were swapped (0 where the kernel is not
    available)."""
    if load_small_linear() is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is nn.Linear
                and child.weight.dtype == torch.float32
                and child.weight.device.type == "cpu"
                and child.weight.is_contiguous()
                and (child.bias is None or child.bias.is_contiguous())
            ):
                setattr(parent, name, RowsLinear(child))
                swapped += 1
    return swapped
