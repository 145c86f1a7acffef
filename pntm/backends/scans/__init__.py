"""Which scan runs: one module per implementation of P-NTM's two scan primitives.

A backend is a framework (``pntm.backends.numpy_backend``, ``torch_backend``, ``mlx_backend``)
plus one of these modules; the backend table (``pntm.backends``) names the pairs. A module here
is all a new implementation needs (a kernel is one file here and one row in that table):

* ``FRAMEWORKS``: the frameworks whose arrays it takes, e.g. ``("torch",)``;
* ``DESCRIPTION``: one line for ``pntm backends``: what runs fused, what stays on the framework
  (or ``describe() -> str`` where that depends on the machine);
* ``linear_scan(ops, a, b, h0) -> h``: ``h_t = a_t h_{t-1} + b_t`` along axis 1, real or
  complex (``Backend.linear_scan``);
* ``memory_scan_read(ops, w, erase, add, rho, m0, key, beta, gamma) -> (reads, final)``: the
  memory recurrence with its location (and, with ``key``, content) reads
  (``Backend.memory_scan_read``);
* optionally ``unavailable_reason() -> str | None``: why it cannot run on this machine;
* optionally fused forms of larger pieces, each tested against the composition it replaces:
  ``head_scan(ops, shift, gate, n_slots, start, lag) -> w`` (``Backend.head_scan``; default:
  the Fourier route through ``linear_scan``), ``block_scan(...)`` (a block's two heads and its
  memory with location reads, ``Backend.block_scan``) and ``block_step(...)`` (one token of
  it, ``Backend.block_step``).

Both functions must be differentiable in the framework's autodiff (their own backward, as a
``torch.autograd.Function``, an ``mx.custom_function`` or ``Backend.custom_vjp``), and are tested
against ``sequential`` in float64 and its hand-written reverse mode, ``reference``.

| module | algorithm |
|---|---|
| ``sequential`` | plain loops over time (the reference algorithm; the loop baseline) |
| ``reference`` | the hand-written reverse mode of ``sequential`` (NumPy), not a backend's scans |
| ``chunked`` | two-level chunked scans in framework operations |
| ``triton`` | fused Triton kernels (PyTorch tensors, CUDA or Triton's CPU interpreter) |
| ``metal`` | fused Metal kernels (MLX arrays, Apple GPUs or a C++ emulator on the CPU) |
| ``numba_cpu`` | fused CPU kernels compiled by numba (PyTorch tensors and MLX arrays) |
"""

NAMES = ("sequential", "chunked", "triton", "metal", "numba_cpu")
