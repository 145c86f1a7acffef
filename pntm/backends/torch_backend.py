"""PyTorch backend: PyTorch operations only (CPU, CUDA or MPS), float32.

The scans are the framework parallel path of :mod:`pntm.backends.parallel`; the memory scan is
one ``torch.autograd.Function`` whose backward is SPEC §4.3 in PyTorch operations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pntm.backends import parallel
from pntm.backends.base import Array, Backend
from pntm.tree import tree_flatten, tree_map, tree_unflatten


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str | None = None, dtype: Any = torch.float32) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.float_dtype = dtype
        self.complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.int_dtype = torch.int64

    # creation and conversion
    def asarray(self, x: Any, dtype: Any = None) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            t = x.to(self.device)
        else:
            t = torch.as_tensor(np.asarray(x), device=self.device)
        if dtype is None:
            if t.is_complex():
                dtype = self.complex_dtype
            elif t.is_floating_point():
                dtype = self.float_dtype
            else:
                dtype = self.int_dtype
        return t.to(dtype)

    def to_numpy(self, x: Array) -> np.ndarray:
        return x.detach().cpu().numpy()

    def zeros_like(self, x):
        return torch.zeros_like(x)

    def ones_like(self, x):
        return torch.ones_like(x)

    # elementwise
    def exp(self, x):
        return torch.exp(x)

    def log(self, x):
        return torch.log(x)

    def tanh(self, x):
        return torch.tanh(x)

    def sigmoid(self, x):
        return torch.sigmoid(x)

    def softplus(self, x):
        return F.softplus(x)

    def sqrt(self, x):
        return torch.sqrt(x)

    def gelu(self, x):
        return F.gelu(x, approximate="tanh")

    def where(self, cond, x, y):
        return torch.where(cond, x, y)

    def one_hot(self, indices, depth):
        return F.one_hot(indices.long(), depth).to(self.float_dtype)

    # reductions
    def sum(self, x, axis=None, keepdims=False):
        return x.sum() if axis is None else x.sum(dim=axis, keepdim=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return x.max() if axis is None else x.amax(dim=axis, keepdim=keepdims)

    def argmax(self, x, axis=-1):
        return torch.argmax(x, dim=axis)

    def softmax(self, x, axis=-1):
        return torch.softmax(x, dim=axis)

    def log_softmax(self, x, axis=-1):
        return torch.log_softmax(x, dim=axis)

    # linear algebra and shape
    def matmul(self, a, b):
        return torch.matmul(a, b)

    def reshape(self, x, shape):
        return x.reshape(tuple(shape))

    def transpose(self, x, axes):
        return x.permute(tuple(axes))

    def concat(self, xs, axis):
        return torch.cat(list(xs), dim=axis)

    def stack(self, xs, axis):
        return torch.stack(list(xs), dim=axis)

    def take(self, table, indices):
        return table[indices.long()]

    def roll(self, x, shift, axis):
        return torch.roll(x, shifts=shift, dims=axis)

    def flip(self, x, axis):
        return torch.flip(x, dims=(axis,))

    # complex and FFT
    def complex(self, real, imag):
        return torch.complex(real, imag)

    def real(self, x):
        return torch.real(x)

    def imag(self, x):
        return torch.imag(x)

    def rfft(self, x, axis=-1):
        return torch.fft.rfft(x, dim=axis)

    def irfft(self, x, n, axis=-1):
        return torch.fft.irfft(x, n=n, dim=axis)

    # autodiff
    def stop_gradient(self, x):
        return x.detach()

    def value_and_grad(self, fn: Callable[..., Any], has_aux: bool = False):
        def value_and_grad_fn(params, *args, **kwargs):
            leaves = tree_map(lambda p: p.detach().requires_grad_(True), params)
            out = fn(leaves, *args, **kwargs)
            loss = out[0] if has_aux else out
            flat = tree_flatten(leaves)
            grads = torch.autograd.grad(loss, list(flat.values()), allow_unused=True)
            grads = {
                k: torch.zeros_like(p) if g is None else g
                for (k, p), g in zip(flat.items(), grads, strict=True)
            }
            detached = tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)
            return detached, tree_unflatten(grads, params)

        return value_and_grad_fn

    def eval(self, *arrays):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # scans
    def linear_scan(self, a, b, h0=None):
        return parallel.chunked_linear_scan(self, a, b, h0)

    def memory_scan_read(self, w, erase, add, rho, m0=None, key=None, beta=None, gamma=None):
        if m0 is None:
            m0 = w.new_zeros((w.shape[0], w.shape[2], w.shape[3], add.shape[-1]))
        return _MemoryScanRead.apply(w, erase, add, rho, m0, key, beta, gamma, self)


class _MemoryScanRead(torch.autograd.Function):
    """The memory scan and its reads as one operation: only chunk-start states are saved."""

    @staticmethod
    def forward(ctx, w, erase, add, rho, m0, key, beta, gamma, ops):
        reads, final, starts, prod = parallel.memory_scan_forward(
            ops, w, erase, add, rho, m0, key, beta, gamma
        )
        ctx.save_for_backward(w, erase, add, rho, key, beta, gamma, starts, prod)
        ctx.ops = ops
        return reads, final

    @staticmethod
    def backward(ctx, d_read, d_final):
        w, erase, add, rho, key, beta, gamma, starts, prod = ctx.saved_tensors
        g = parallel.memory_scan_backward(
            ctx.ops, w, erase, add, rho, starts, prod, d_read, d_final, key, beta, gamma
        )
        return (g["w"], g["erase"], g["add"], g["rho"], g["m0"],
                g.get("key"), g.get("beta"), g.get("gamma"), None)
