"""Compile every Triton kernel configuration that ``pntm.backends.scans.triton`` launches for a
real NVIDIA GPU (sm_90 by default), without a GPU: Triton's ahead-of-time path (``ASTSource`` and
``triton.compile``, with its bundled ptxas). The interpreter runs the kernels' semantics; this
catches what only the compiler rejects. Run in a process of its own with
``TRITON_INTERPRET=0`` (the kernels must be defined as compilable functions):

    TRITON_INTERPRET=0 python tests/triton_compile_check.py [ARCH]

Prints one line per configuration with its registers and spill bytes where ptxas reports them;
exits non-zero if any configuration fails to compile.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import traceback

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pntm.backends.scans import triton as kernels

INPUTS = ("w_ptr", "e_ptr", "a_ptr", "rho_ptr", "key_ptr", "beta_ptr", "gamma_ptr", "dr_ptr")


def signature(fn, constexprs: dict, pointers: dict, sizes: dict):
    """The signature a launch gives Triton: pointers of the given dtypes (float32 if not
    named), all 16-byte aligned; integers as i32, with the divisible-by-16 hint where a launch
    would see a multiple of 16 (time sizes are not specialised: they get none)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if sizes.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def configurations():
    """(name, kernel, constexprs, num_warps, pointer dtypes, sizes) of every launch kind, for
    the tile shapes the planner picks for typical sizes."""
    out = []
    for N, D, content in (
        (64, 64, True),
        (128, 64, True),
        (7, 5, True),
        (64, 64, False),
        (1, 1, False),
    ):
        plan = kernels.plan_memory(2, 100, 4, N, D, content, kernels.torch.device("cpu"))
        tiles = dict(CHUNK=plan.chunk, BN=plan.block_n, BD=plan.block_d, CONTENT=content)
        tiles.update(EPS=kernels.COSINE_EPS, STAGES=kernels.PIPELINE_STAGES)
        tag = f"{'content' if content else 'location'} {plan.block_n}x{plan.block_d}"
        sizes = dict(N=N, D=D, K=4)
        for dtype in ("fp32", "bf16"):
            inputs = dict.fromkeys(INPUTS, dtype)
            outputs = dict(reads_ptr=dtype, final_ptr=dtype)
            for mode, start in (
                (dict(FROM_STARTS=False, SAVE=True, SUMMARY=False), dtype),  # start = m0
                (dict(FROM_STARTS=True, SAVE=False, SUMMARY=False), "fp32"),  # segment starts
                (dict(FROM_STARTS=False, SAVE=False, SUMMARY=True), dtype),  # start unused
            ):
                flags = ",".join(k for k, v in mode.items() if v) or "plain"
                pointers = {**inputs, **outputs, "start_ptr": start}
                out.append((f"memory fwd {tag} {dtype} {flags}", kernels._memory_forward_kernel,
                            {**tiles, **mode}, plan.num_warps, pointers, sizes))  # fmt: skip
            # the cotangent at the end: d_final (input dtype) with one segment, else float32
            backward_modes = [
                (dict(HAS_G_END=True, SUMMARY=False, NEED_STATES=True), dtype),
                (dict(HAS_G_END=False, SUMMARY=False, NEED_STATES=True), dtype),
                (dict(HAS_G_END=False, SUMMARY=True, NEED_STATES=content), dtype),
            ]
            if dtype != "fp32":
                backward_modes.append((backward_modes[0][0], "fp32"))
            for mode, g_end in backward_modes:
                flags = ",".join(k for k, v in mode.items() if v) + f",g_end {g_end}"
                consts = {**tiles, **mode, "STAGES": plan.stages_backward}
                pointers = {**inputs, "g_end_ptr": g_end}
                out.append((f"memory bwd {tag} {dtype} {flags}", kernels._memory_backward_kernel,
                            consts, plan.num_warps_backward, pointers, sizes))  # fmt: skip
            for reverse in (False, True):  # x0: m0, or d_final, both in the input dtype
                out.append((f"segment scan {tag} {dtype} reverse={reverse}",
                            kernels._segment_scan_kernel,
                            dict(BN=plan.block_n, BD=plan.block_d, REVERSE=reverse, HAS_X0=True),
                            plan.num_warps, {"x0_ptr": dtype}, sizes))  # fmt: skip
    for complex_ in (True, False):
        for dtype in ("fp32",) if complex_ else ("fp32", "bf16"):
            for fn in (kernels._linear_forward_kernel, kernels._linear_backward_kernel):
                consts = dict(BT=64, BR=32, COMPLEX=complex_, STAGES=kernels.PIPELINE_STAGES)
                pointers = {name: dtype for name in fn.arg_names if name.endswith("_ptr")}
                out.append((f"linear {fn.fn.__name__} complex={complex_} {dtype}", fn, consts, 8,
                            pointers, dict(R=4 * 33)))  # fmt: skip
    return out


def resources(compiled) -> str:
    """Registers and local memory (stack: spills) per thread, from the bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        try:
            text = subprocess.run(
                [tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return "resources unknown"
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", text, re.S)
    pipelined = len(re.findall(r"cp\.async\.c", compiled.asm["ptx"]))
    usage = f"registers {found[1]}, stack {found[2]} B" if found else "resources unknown"
    return f"{usage}, {pipelined} pipelined loads"


def main(arch: int = 90) -> int:
    if not hasattr(kernels._memory_forward_kernel, "arg_names"):
        print("the kernels were defined for the interpreter: run with TRITON_INTERPRET=0")
        return 2
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for name, fn, consts, num_warps, pointers, sizes in configurations():
        sig, attrs = signature(fn, consts, pointers, sizes)
        try:
            compiled = triton.compile(
                ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                target=target,
                options=dict(num_warps=num_warps),
            )
        except Exception:
            failures += 1
            print(f"FAIL {name}\n{traceback.format_exc()}")
            continue
        print(f"ok   {name} (num_warps={num_warps}, {resources(compiled)})")
    print(f"{failures} of {len(configurations())} configurations failed to compile for sm_{arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
