"""The PyTorch framework (CPU, CUDA or MPS), float32.

With the ``chunked`` scans (PyTorch operations) this is the ``torch`` backend; with the ``triton``
scans (fused kernels on the same tensors), the ``triton`` backend.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from pntm.backends.base import (
    Array,
    Backend,
    ProcessGroup,
    ProcessGroupError,
    check_attention_shapes,
    check_lstm_shapes,
    collective_timeout_s,
)
from pntm.tree import tree_flatten, tree_map, tree_unflatten


def default_device() -> str:
    """The GPU of this process's rank on its node (``LOCAL_RANK`` under torchrun), else the CPU.
    NCCL wants one GPU per rank, so a node with fewer GPUs than processes is refused."""
    if not torch.cuda.is_available():
        return "cpu"
    local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"process of local rank {local_rank} has no GPU: this node has {count} CUDA "
            f"device(s), one per process; start at most {count} processes per node, or hide "
            "the GPUs (CUDA_VISIBLE_DEVICES='') to run every process on the CPU"
        )
    return f"cuda:{local_rank}"


class TorchBackend(Backend):
    name = "torch"
    framework = "torch"

    def __init__(
        self, device: str | None = None, dtype: Any = torch.float32, scan: str = "chunked"
    ) -> None:
        if device is None:
            device = default_device()
        self.device = torch.device(device)
        self.on_cpu = self.device.type == "cpu"
        if self.device.type == "cuda":
            # cuDNN's LSTM rounds its fp32 products to TF32 by default (errors ~3e-4 against
            # the float64 reference on an H100); float32 here means float32, as in our matmuls
            torch.backends.cudnn.allow_tf32 = False
        self.float_dtype = dtype
        self.complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.int_dtype = torch.int64
        super().__init__(scan)

    @classmethod
    def describe(cls) -> str:
        if torch.cuda.is_available():
            return f"PyTorch {torch.__version__} on cuda ({torch.cuda.get_device_name()})"
        return f"PyTorch {torch.__version__} on cpu"

    @classmethod
    def accelerator(cls) -> str | None:
        return "cuda" if torch.cuda.is_available() else None

    def set_framework_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)

    def framework_threads(self) -> int | None:
        return torch.get_num_threads()

    def memory_limit(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        return super().memory_limit()

    def _join_process_group(self) -> ProcessGroup:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return TorchProcessGroup(self.device) if world > 1 else ProcessGroup()

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

    def unstack(self, x, axis):
        return list(torch.unbind(x, dim=axis))

    def take(self, table, indices):
        return table[indices.long()]

    def roll(self, x, shift, axis):
        return torch.roll(x, shifts=shift, dims=axis)

    def flip(self, x, axis):
        return torch.flip(x, dims=(axis,))

    # complex and FFT
    def complex(self, real, imag):
        return torch.complex(real, imag)

    def conj(self, x):
        return torch.conj_physical(x) if x.is_complex() else x

    def real(self, x):
        return torch.real(x)

    def imag(self, x):
        return torch.imag(x)

    def rfft(self, x, axis=-1):
        return torch.fft.rfft(x, dim=axis)

    def irfft(self, x, n, axis=-1):
        return torch.fft.irfft(x, n=n, dim=axis)

    # memory-write arithmetic, fused with addcmul: x - (w e^T) x is exactly 0 where w e = 1
    def decay_mul(self, x, w, erase):
        return torch.addcmul(x, w[..., None] * erase[..., None, :], x, value=-1)

    def outer_add(self, x, u, v):
        return torch.addcmul(x, u[..., None], v[..., None, :])

    # the peers' primitives: PyTorch's fused kernels
    def lstm(self, x, h0, c0, w_ih, w_hh, bias):
        """``torch.lstm``, the kernel behind ``nn.LSTM``: cuDNN on CUDA, ATen's fused cell on
        the CPU. Our (I, 4H) weights are PyTorch's (4H, I) transposed (same gate order); the
        one bias goes in as ``b_ih`` with a zero ``b_hh``. cuDNN views each weight as one flat
        block, so the transposes are made contiguous (a strided view fails there on CUDA)."""
        check_lstm_shapes(x, h0, c0, w_ih, w_hh, bias)
        weights = [w_ih.T.contiguous(), w_hh.T.contiguous(), bias, torch.zeros_like(bias)]
        with warnings.catch_warnings():
            # cuDNN copies weights that are not one flat buffer into one (nn.LSTM keeps them
            # flat); ours are the model's own parameters, a few kB per layer: the copy is cheap
            warnings.filterwarnings("ignore", message="RNN module weights are not part")
            out, h, c = torch.lstm(
                x, (h0[None], c0[None]), weights, True, 1, 0.0, torch.is_grad_enabled(), False, True
            )
        return out, (h[0], c[0])

    def attention(self, q, k, v, causal):
        """``scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA, the
        fused CPU kernel). Its ``is_causal`` aligns the mask to the *upper left* when Tq != Tk,
        so it is used only for Tq = Tk; with a KV cache (Tq < Tk) the mask is the lower-right
        one (``causal_lower_right`` keeps the fused kernels on CUDA), and one query (Tq = 1)
        needs none."""
        check_attention_shapes(q, k, v, causal)
        n_queries, n_keys = q.shape[-2], k.shape[-2]
        if not causal or n_queries == 1:
            return F.scaled_dot_product_attention(q, k, v)
        if n_queries == n_keys:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = causal_lower_right(n_queries, n_keys)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

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

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    def custom_vjp(self, forward, backward, n_outputs, **static):
        def op(*inputs):
            outputs = _CustomVJP.apply(self, forward, backward, n_outputs, static, *inputs)
            return outputs[0] if n_outputs == 1 else outputs

        return op


class _CustomVJP(torch.autograd.Function):
    """``Backend.custom_vjp``: the residuals are saved, never returned."""

    @staticmethod
    def forward(ctx, ops, forward, backward, n_outputs, static, *inputs):
        results = tuple(forward(ops, *inputs, **static))
        outputs, residuals = results[:n_outputs], results[n_outputs:]
        ctx.save_for_backward(*inputs, *residuals)
        ctx.ops, ctx.backward_fn, ctx.static, ctx.n_inputs = ops, backward, static, len(inputs)
        return outputs

    @staticmethod
    def backward(ctx, *cotangents):
        saved = ctx.saved_tensors
        inputs, residuals = saved[: ctx.n_inputs], saved[ctx.n_inputs :]
        grads = ctx.backward_fn(ctx.ops, inputs, residuals, cotangents, **ctx.static)
        return (None, None, None, None, None, *grads)


class TorchProcessGroup(ProcessGroup):
    """The ranks of a ``torchrun`` launch: NCCL between GPUs, gloo between CPU processes."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            # torchrun itself stops the other ranks as soon as one exits; the timeout is for
            # a rank that died or stopped without it noticing
            timeout = timedelta(seconds=collective_timeout_s())
            dist.init_process_group(backend, timeout=timeout)
        self.dist, self.device = dist, device
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.engine = f"torch.distributed ({backend})"

    def _sum_flat(self, pieces: list[Array]) -> Array:
        flat = torch.cat(pieces)
        self._all_reduce(flat)
        return flat

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        buffer = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self._all_reduce(buffer)
        return buffer.tolist()

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        try:
            self.dist.all_reduce(tensor)
        except RuntimeError as exc:  # gloo and NCCL report a lost peer as RuntimeError
            raise ProcessGroupError(self, exc) from exc

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
