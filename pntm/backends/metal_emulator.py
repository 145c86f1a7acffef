"""Runs ``mx.fast.metal_kernel`` kernels on a CPU, for machines without Metal (Linux, CI).

:class:`EmulatedKernel` takes the arguments of ``mx.fast.metal_kernel`` and is called like the
kernel it returns. From the same kernel body, header, input and output names and template
arguments it writes the function MLX would generate (the same parameters, in the same order, the
same Metal attributes picked from the body), as C++ under ``metal_shim.h``; compiles it with the
system C++ compiler (cached by the source's hash); and runs the launch grid on the CPU, every
threadgroup's threads as fibers that meet at barriers and SIMD-group functions.

What it checks on the way: every index into a device buffer (an out-of-bounds access raises
:class:`MetalEmulationError` naming the buffer, the index and the thread), that every thread
reaches each barrier and every lane each SIMD-group function, and that outputs are written (they
start as NaN, or ``init_value``). It cannot see what only the Metal compiler would reject, nor
time anything.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

SHIM = Path(__file__).with_name("metal_shim.h")
#: MLX passes inputs of fewer elements in the constant address space (``metal_kernel.cpp``)
MAX_CONSTANT_ARRAY_SIZE = 8
#: bytes of stack per emulated thread
STACK_BYTES = 1 << 16
MAX_THREADS_PER_THREADGROUP = 1024

# (MSL type as MLX writes it, NumPy dtype of the buffer) per MLX dtype
_TYPES = {
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),  # its bits; NumPy has no bfloat16
    mx.int32: ("int32_t", np.int32),
    mx.uint32: ("uint32_t", np.uint32),
    mx.int64: ("int64_t", np.int64),
    mx.uint8: ("uint8_t", np.uint8),
    mx.bool_: ("bool", np.bool_),
}

# The Metal attributes MLX adds to the signature when the body names them (its order), and what
# each is on the emulated thread ``f`` of ``pntm_emu::group``.
_G = "pntm_emu::group->"
_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": (
        "uint",
        f"({_G}dispatch.x * {_G}dispatch.y * {_G}dispatch.z + 3) / 4",
    ),
    "dispatch_simdgroups_per_threadgroup": (
        "uint",
        f"({_G}dispatch.x * {_G}dispatch.y * {_G}dispatch.z + 31) / 32",
    ),
    "dispatch_threads_per_threadgroup": ("uint3", f"{_G}dispatch"),
    "grid_origin": ("uint3", "uint3{0, 0, 0}"),
    "grid_size": ("uint3", f"{_G}grid"),
    "quadgroup_index_in_threadgroup": ("uint", "f.index_in_group / 4"),
    "quadgroups_per_threadgroup": ("uint", f"({_G}size.x * {_G}size.y * {_G}size.z + 3) / 4"),
    "simdgroup_index_in_threadgroup": ("uint", "f.index_in_group / 32"),
    "simdgroups_per_threadgroup": ("uint", f"({_G}size.x * {_G}size.y * {_G}size.z + 31) / 32"),
    "thread_execution_width": ("uint", "32"),
    "thread_index_in_quadgroup": ("uint", "f.index_in_group % 4"),
    "thread_index_in_simdgroup": ("uint", "f.index_in_group % 32"),
    "thread_index_in_threadgroup": ("uint", "f.index_in_group"),
    "thread_position_in_grid": ("uint3", "f.position_in_grid"),
    "thread_position_in_threadgroup": ("uint3", "f.position_in_group"),
    "threadgroup_position_in_grid": ("uint3", f"{_G}position"),
    "threadgroups_per_grid": ("uint3", f"{_G}groups"),
    "threads_per_grid": ("uint3", f"{_G}grid"),
    "threads_per_simdgroup": ("uint", "32"),
    "threads_per_threadgroup": ("uint3", f"{_G}size"),
}

# a threadgroup array declared with the bare qualifier would be one per thread here
_BARE_THREADGROUP_ARRAY = re.compile(r"\bthreadgroup\s+[\w:<>]+\s+\w+\s*\[")


class MetalEmulationError(RuntimeError):
    """A kernel did something the emulator checks for: an out-of-bounds access, a barrier or
    SIMD-group function not reached by every thread, or it did not compile."""


def compiler() -> str | None:
    """The C++ compiler the emulator uses (``$CXX``, else ``c++``), if there is one."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _cache_dir() -> Path:
    root = os.environ.get("PNTM_METAL_EMULATOR_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pntm" / "metal-emulator"


# loaded libraries, by the C++ source they were compiled from (this process's shim)
_LIBRARIES: dict[str, ctypes.CDLL] = {}


def _type_of(dtype: Any) -> tuple[str, Any]:
    if dtype not in _TYPES:
        raise ValueError(f"the Metal emulator does not handle dtype {dtype}; it handles {_TYPES}")
    return _TYPES[dtype]


def _template_value(value: Any) -> str:
    """A template argument as MLX writes it (``write_template``)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return _type_of(value)[0]


class EmulatedKernel:
    """``mx.fast.metal_kernel(...)``, run on the CPU: same constructor, same call."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
    ) -> None:
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if atomic_outputs:
            raise ValueError("the Metal emulator does not handle atomic_outputs")
        for text in (source, header):
            code = "\n".join(s for s in text.splitlines() if not s.lstrip().startswith("#"))
            match = _BARE_THREADGROUP_ARRAY.search(code)
            if match:
                raise ValueError(
                    f"kernel {name!r} declares a threadgroup array as {match.group(0)!r}: "
                    "declare it with PNTM_THREADGROUP_ARRAY(type, name, size), which the "
                    "emulator gives one instance per threadgroup"
                )
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        # as MLX: attributes and shape parameters are picked by searching the body
        self.attributes = [a for a in _ATTRIBUTES if a in source]
        self.shape_info = [
            tuple(f"{n}_{what}" in source for what in ("shape", "strides", "ndim"))
            for n in self.input_names
        ]

    # ------------------------------------------------------------------ the generated C++
    def cpp_source(
        self,
        inputs: Sequence[mx.array],
        output_dtypes: Sequence[Any],
        template: Sequence[tuple[str, Any]] = (),
    ) -> str:
        """The translation unit the emulator compiles for these inputs: the shim, the header,
        the kernel with MLX's signature around the body, and the launcher."""
        params, args = [], []
        for i, (name, x) in enumerate(zip(self.input_names, inputs, strict=True)):
            ctype = _type_of(x.dtype)[0]
            if x.ndim == 0:
                params.append(f"const {ctype}& {name}")
                args.append(f"*static_cast<const {ctype}*>(buffers[{i}])")
                continue
            params.append(f"pntm_emu::Checked<const {ctype}> {name}")
            args.append(
                f"pntm_emu::Checked<const {ctype}>{{static_cast<const {ctype}*>(buffers[{i}]), "
                f'counts[{i}], 0, "{name}"}}'
            )
            shape, strides, ndim = self.shape_info[i]
            if shape:
                params.append(f"const int* {name}_shape")
                args.append(f"shapes[{i}]")
            if strides:
                params.append(f"const int64_t* {name}_strides")
                args.append(f"strides[{i}]")
            if ndim:
                params.append(f"const int& {name}_ndim")
                args.append(f"ndims[{i}]")
        for j, (name, dtype) in enumerate(zip(self.output_names, output_dtypes, strict=True)):
            ctype = _type_of(dtype)[0]
            k = len(inputs) + j
            params.append(f"pntm_emu::Checked<{ctype}> {name}")
            args.append(
                f"pntm_emu::Checked<{ctype}>{{static_cast<{ctype}*>(buffers[{k}]), "
                f'counts[{k}], 0, "{name}"}}'
            )
        for attr in self.attributes:
            ctype, value = _ATTRIBUTES[attr]
            params.append(f"{ctype} {attr}")
            args.append(value)
        function = f"custom_kernel_{self.name}"
        template_params = ", ".join(
            f"{'bool' if isinstance(v, bool) else 'int' if isinstance(v, int) else 'typename'} {n}"
            for n, v in template
        )
        template_args = ", ".join(_template_value(v) for _, v in template)
        call = f"{function}<{template_args}>" if template else function
        sep = ",\n    "
        return (
            f'#include "{SHIM}"\n'
            f"{self.header}\n"
            + (f"template <{template_params}>\n" if template else "")
            + f"void {function}(\n    {sep.join(params)}) {{\n{self.source}\n}}\n\n"
            'extern "C" int pntm_launch(void** buffers, const int64_t* counts,\n'
            "    const int** shapes, const int64_t** strides, const int* ndims,\n"
            "    const int64_t* launch_grid, const int64_t* launch_group, int64_t stack_bytes,\n"
            "    char* message, int64_t message_size) {\n"
            "  auto body = [&](const pntm_emu::Fiber& f) {\n"
            f"    (void)f;\n    {call}(\n        {(',' + chr(10) + '        ').join(args)});\n"
            "  };\n"
            "  // (no name the shim defines as a macro, such as threadgroup, may appear here)\n"
            "  return pntm_emu::launch(launch_grid, launch_group, body, message, message_size, "
            "stack_bytes);\n}\n"
        )

    def _library(self, cpp: str) -> ctypes.CDLL:
        if cpp in _LIBRARIES:  # every launch after the first: no file read, no hashing
            return _LIBRARIES[cpp]
        digest = hashlib.sha256((cpp + SHIM.read_text()).encode()).hexdigest()[:24]
        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        library = cache / f"{self.name}-{digest}.so"
        if not library.exists():
            cxx = compiler()
            if cxx is None:
                raise MetalEmulationError(
                    f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} is not on PATH): the "
                    "Metal emulator compiles kernels with one (set CXX to choose it)"
                )
            source = cache / f"{self.name}-{digest}.cpp"
            _write_atomically(source, cpp.encode())
            fd, partial = tempfile.mkstemp(dir=cache, suffix=".so.partial")
            os.close(fd)
            command = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-o", partial, str(source)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                os.unlink(partial)
                raise MetalEmulationError(
                    f"kernel {self.name!r} did not compile as C++ under the Metal shim "
                    f"({source}):\n{done.stderr[-4000:]}"
                )
            os.replace(partial, library)
        lib = ctypes.CDLL(str(library))
        lib.pntm_launch.restype = ctypes.c_int
        _LIBRARIES[cpp] = lib
        return lib

    # ------------------------------------------------------------------ the call
    def __call__(
        self,
        *,
        inputs: Sequence[Any],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[Any],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        template: Sequence[tuple[str, Any]] = (),
        init_value: float | None = None,
        verbose: bool = False,
        stream: Any = None,
    ) -> list[mx.array]:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} "
                f"but got size {len(inputs)}."
            )
        if len(output_shapes) != len(self.output_names) or len(output_dtypes) != len(
            self.output_names
        ):
            raise ValueError(
                f"[metal_kernel] Expected {len(self.output_names)} output shapes and dtypes"
            )
        threads = int(np.prod(threadgroup))
        if threads > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(
                f"Thread group size ({threads}) is greater than the maximum allowed threads "
                f"per threadgroup ({MAX_THREADS_PER_THREADGROUP})."
            )
        if min(*grid, *threadgroup) < 1:
            raise ValueError(f"grid {grid} and threadgroup {threadgroup} must be positive")
        arrays = [mx.array(x) if not isinstance(x, mx.array) else x for x in inputs]
        cpp = self.cpp_source(arrays, output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}` (emulated):\n```\n{cpp}\n```")
        lib = self._library(cpp)

        buffers = [_to_numpy(x) for x in arrays]
        outputs = []
        for shape, dtype in zip(output_shapes, output_dtypes, strict=True):
            np_dtype = _type_of(dtype)[1]
            out = np.empty(tuple(shape), dtype=np_dtype)
            if dtype == mx.bfloat16:  # fill through MLX, which rounds to bfloat16
                fill = float("nan") if init_value is None else init_value
                out[...] = _to_numpy(mx.full((1,), fill, dtype=mx.bfloat16))[0]
            elif np.issubdtype(np_dtype, np.floating):
                out.fill(float("nan") if init_value is None else init_value)
            else:  # MLX leaves outputs uninitialized: a pattern, not zeros
                out.fill(init_value if init_value is not None else np.iinfo(np_dtype).max)
            outputs.append(out)
        everything = buffers + outputs
        pointers = (ctypes.c_void_p * len(everything))(*[a.ctypes.data for a in everything])
        counts = (ctypes.c_int64 * len(everything))(*[a.size for a in everything])
        shapes = [np.asarray(x.shape, dtype=np.int32) for x in buffers]
        strides = [
            np.asarray([s // x.itemsize for s in x.strides], dtype=np.int64) for x in buffers
        ]
        shape_ptrs = (ctypes.c_void_p * max(1, len(buffers)))(*[s.ctypes.data for s in shapes])
        stride_ptrs = (ctypes.c_void_p * max(1, len(buffers)))(*[s.ctypes.data for s in strides])
        ndims = (ctypes.c_int * max(1, len(buffers)))(*[x.ndim for x in buffers])
        message = ctypes.create_string_buffer(2048)
        failed = lib.pntm_launch(
            pointers,
            counts,
            shape_ptrs,
            stride_ptrs,
            ndims,
            (ctypes.c_int64 * 3)(*grid),
            (ctypes.c_int64 * 3)(*threadgroup),
            ctypes.c_int64(STACK_BYTES),
            message,
            ctypes.c_int64(len(message)),
        )
        if failed:
            raise MetalEmulationError(f"kernel {self.name!r}: {message.value.decode()}")
        return [_from_numpy(out, dtype) for out, dtype in zip(outputs, output_dtypes, strict=True)]


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        return np.ascontiguousarray(np.array(mx.view(x, mx.uint16)))
    _type_of(x.dtype)
    return np.ascontiguousarray(np.array(x))


def _from_numpy(x: np.ndarray, dtype: Any) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.view(mx.array(x), mx.bfloat16)
    return mx.array(x)


def _write_atomically(path: Path, data: bytes) -> None:
    fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(partial, path)
