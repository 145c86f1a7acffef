"""The Metal emulator itself (pntm.backends.metal_emulator): it must run a kernel as Metal would,
and catch what Metal would not tell: out-of-bounds accesses, barriers and SIMD-group functions
not every thread reaches, threadgroup memory read without the barrier that orders it, outputs
never written. Small kernels written for each case."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
emulator = pytest.importorskip("pntm.backends.metal_emulator")
if emulator.compiler() is None:
    pytest.skip("the Metal emulator needs a C++ compiler (c++ or $CXX)", allow_module_level=True)

EmulatedKernel = emulator.EmulatedKernel
MetalEmulationError = emulator.MetalEmulationError


def run(source, inputs, out_shape, grid, group, header="", template=(), dtype=None, **kw):
    """One launch of a kernel with one input ``inp`` and one output ``out``."""
    kernel = EmulatedKernel("t", ["inp"], ["out"], source, header)
    return kernel(
        inputs=inputs,
        template=list(template),
        grid=grid,
        threadgroup=group,
        output_shapes=[out_shape],
        output_dtypes=[dtype or mx.float32],
        **kw,
    )[0]


def test_the_mlx_documentation_example_runs():
    source = """
        uint elem = thread_position_in_grid.x;
        T tmp = inp[elem];
        out[elem] = metal::exp(tmp);
    """
    a = mx.random.normal(shape=(4, 16))
    out = run(source, [a], a.shape, (a.size, 1, 1), (256, 1, 1), template=[("T", mx.float32)])
    assert mx.allclose(out, mx.exp(a)).item()


def test_a_planted_out_of_bounds_write_is_caught():
    source = "out[thread_position_in_grid.x + 1] = inp[thread_position_in_grid.x];"
    x = mx.arange(64, dtype=mx.float32)
    with pytest.raises(MetalEmulationError, match=r"buffer 'out': element 64 of 64.*\(63, 0, 0\)"):
        run(source, [x], (64,), (64, 1, 1), (32, 1, 1))


def test_out_of_bounds_reads_and_negative_indices_are_caught():
    x = mx.arange(8, dtype=mx.float32)
    with pytest.raises(MetalEmulationError, match=r"buffer 'inp': element 8 of 8"):
        run("out[0] = inp[thread_position_in_grid.x + 1];", [x], (1,), (8, 1, 1), (8, 1, 1))
    with pytest.raises(MetalEmulationError, match=r"buffer 'inp': element -1 of 8"):
        run("out[0] = inp[int(thread_position_in_grid.x) - 1];", [x], (1,), (8, 1, 1), (8, 1, 1))


def test_outputs_a_kernel_does_not_write_are_nan():
    out = run("if (thread_position_in_grid.x < 3) out[thread_position_in_grid.x] = 1.0f;",
              [mx.zeros((1,))], (5,), (5, 1, 1), (5, 1, 1))  # fmt: skip
    assert np.array(out)[:3].tolist() == [1, 1, 1] and np.isnan(np.array(out)[3:]).all()
    filled = run("", [mx.zeros((1,))], (2,), (1, 1, 1), (1, 1, 1), init_value=7.0)
    assert np.array(filled).tolist() == [7, 7]


GROUP_SUM = """
    const uint lane = thread_index_in_simdgroup;
    const uint simdgroup = simdgroup_index_in_threadgroup;
    PNTM_THREADGROUP_ARRAY(float, partial, 32);
    const float s = simd_sum(inp[thread_position_in_grid.x]);
    if (lane == 0) {
      partial[simdgroup] = s;
    }
    BARRIER
    if (thread_index_in_threadgroup == 0) {
      float total = 0.0f;
      for (uint g = 0; g < simdgroups_per_threadgroup; ++g) {
        total += partial[g];
      }
      out[threadgroup_position_in_grid.x] = total;
    }
"""


def test_simd_sums_and_threadgroup_memory_across_groups():
    """Three threadgroups of 100 threads (four SIMD groups, the last one partial)."""
    x = mx.random.normal(shape=(300,))
    source = GROUP_SUM.replace("BARRIER", "threadgroup_barrier(mem_flags::mem_threadgroup);")
    out = run(source, [x], (3,), (300, 1, 1), (100, 1, 1))
    assert np.allclose(np.array(out), np.array(x).reshape(3, 100).sum(1), atol=1e-5)


def test_threadgroup_memory_read_without_its_barrier_gives_a_wrong_result():
    """Without the barrier, thread 0 reads the partials before the other SIMD groups wrote
    them: the emulator runs SIMD groups apart between barriers, so the race shows."""
    x = mx.ones((128,))
    out = run(GROUP_SUM.replace("BARRIER", ""), [x], (1,), (128, 1, 1), (128, 1, 1))
    assert np.array(out)[0] != 128.0


def test_threadgroup_memory_starts_each_threadgroup_as_nan():
    """Metal leaves threadgroup memory undefined: a read before any write (here: what the
    previous threadgroup left) must not look valid."""
    source = """
        PNTM_THREADGROUP_ARRAY(float, scratch, 4);
        const uint tid = thread_index_in_threadgroup;
        out[thread_position_in_grid.x] = scratch[tid];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        scratch[tid] = 1.0f;
    """
    out = run(source, [mx.zeros((1,))], (8,), (8, 1, 1), (4, 1, 1))
    assert np.isnan(np.array(out)).all()


def test_threads_waiting_at_different_barriers_are_caught():
    source = """
        if (thread_index_in_threadgroup == 0) {
          threadgroup_barrier(mem_flags::mem_threadgroup);
        } else {
          threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        out[thread_position_in_grid.x] = 1.0f;
    """
    with pytest.raises(MetalEmulationError, match="different threadgroup_barrier calls"):
        run(source, [mx.zeros((1,))], (64,), (64, 1, 1), (64, 1, 1))


def test_a_barrier_not_every_thread_reaches_is_caught():
    source = """
        if (thread_index_in_threadgroup < 40) {
          threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        out[thread_position_in_grid.x] = 1.0f;
    """
    with pytest.raises(MetalEmulationError, match="threadgroup_barrier was not reached"):
        run(source, [mx.zeros((1,))], (64,), (64, 1, 1), (64, 1, 1))


def test_a_simd_function_not_every_lane_reaches_is_caught():
    source = """
        float s = 0.0f;
        if (thread_index_in_simdgroup < 16) {
          s = simd_sum(1.0f);
        }
        out[thread_position_in_grid.x] = s;
    """
    with pytest.raises(MetalEmulationError, match="SIMD-group function was not reached"):
        run(source, [mx.zeros((1,))], (32,), (32, 1, 1), (32, 1, 1))


def test_attributes_shapes_and_template_arguments_reach_the_body():
    source = """
        const uint3 p = thread_position_in_grid;
        const uint i = p.x + threads_per_grid.x * (p.y + threads_per_grid.y * p.z);
        out[i] = float(inp_shape[1] * 1000 + inp_strides[0] * 10 + inp_ndim) + (FLAG ? SCALE : 0)
                 + float(threadgroup_position_in_grid.x);
    """
    x = mx.zeros((2, 3))
    out = run(source, [x], (12,), (3, 2, 2), (2, 2, 1), template=[("SCALE", 5), ("FLAG", True)])
    groups = np.array([0, 0, 1] * 4)  # x of threadgroup position: threads 0-1, then 2
    assert np.array(out).tolist() == (3000 + 30 + 2 + 5 + groups).tolist()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_buffers_round_trip(dtype):
    x = mx.array([1.0, -2.5, 3.140625, 1000.0]).astype(dtype)
    source = "uint i = thread_position_in_grid.x; out[i] = static_cast<T>(float(inp[i]) * 2.0f);"
    out = run(source, [x], (4,), (4, 1, 1), (4, 1, 1), template=[("T", dtype)], dtype=dtype)
    assert out.dtype == dtype and mx.array_equal(out, x * 2).item()


def test_sources_that_would_differ_on_metal_are_refused():
    with pytest.raises(ValueError, match="PNTM_THREADGROUP_ARRAY"):
        EmulatedKernel("t", ["a"], ["b"], "threadgroup float scratch[32];")
    kernel = EmulatedKernel("t", ["inp"], ["out"], "out[0] = undefined_name;")
    with pytest.raises(MetalEmulationError, match=r"(?s)did not compile.*undefined_name"):
        kernel(inputs=[mx.zeros((1,))], grid=(1, 1, 1), threadgroup=(1, 1, 1),
               output_shapes=[(1,)], output_dtypes=[mx.float32])  # fmt: skip
    with pytest.raises(ValueError, match=r"Thread group size \(2048\) is greater"):
        kernel(inputs=[mx.zeros((1,))], grid=(1, 1, 1), threadgroup=(2048, 1, 1),
               output_shapes=[(1,)], output_dtypes=[mx.float32])  # fmt: skip


def test_the_generated_signature_is_mlxs():
    """Inputs, then shape parameters named in the body, then outputs, then the attributes the
    body names, in MLX's order; a scalar input is a reference."""
    source = (
        "out[0] = a[0] + s + float(a_shape[0]) + float(thread_index_in_simdgroup) "
        "+ float(thread_position_in_grid.x);"
    )
    kernel = EmulatedKernel("sig", ["a", "s"], ["out"], source)
    cpp = kernel.cpp_source([mx.zeros((9,)), mx.array(1.0)], [mx.float32], [("T", mx.float16)])
    signature = cpp[cpp.index("void custom_kernel_sig(") : cpp.index(") {")]
    names = [p.split()[-1] for p in signature.split("(", 1)[1].split(",")]
    assert names == [
        "a", "a_shape", "s", "out", "thread_index_in_simdgroup", "thread_position_in_grid",
    ]  # fmt: skip
    assert "const float& s" in signature and "template <typename T>" in cpp
