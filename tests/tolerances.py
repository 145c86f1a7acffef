"""Every tolerance of the conformance suite, in one place.

Errors are measured as ``max|x - ref| / max|ref|`` (:func:`rel_err`): relative to the scale of
the whole compared array, because scan outputs pass near zero where an elementwise relative
error means nothing.

The reference is NumPy in float64; framework backends compute in float32 (unit roundoff
``2^-24 ≈ 6e-8``). A first-order scan accumulates roundoff roughly linearly in the number of
steps that carry weight, and a model stacks several of them; the bounds below leave a margin of
10-100x over what is observed (about 1e-6 on outputs, see the closing note of issue 2).
"""

from __future__ import annotations

import numpy as np

# float32 framework path vs float64 reference
FWD_RTOL = 1e-5  # scan outputs and model logits, T up to a few hundred
GRAD_RTOL = 1e-4  # gradients: one more pass of roundoff, and sums over T
LONG_T_RTOL = 1e-4  # T = 65,536 (the bound stated in issue 2)

# float64 vs float64: two algorithms for the same function (FFT scan vs slot-space loop)
EXACT_RTOL = 1e-10

# central finite differences of a float64 function, step FD_EPS: truncation O(eps^2 f''') and
# cancellation O(1e-16 / eps) are both ~1e-10 relative; 1e-6 leaves room for curvature
FD_EPS = 1e-5
FD_RTOL_REFERENCE = 1e-6  # hand-written float64 gradients vs finite differences
FD_RTOL_FLOAT32 = 1e-3  # float32 autodiff gradients vs float64 finite differences


# Arrays whose largest entry is below this are compared on this scale instead: a quantity that
# is zero analytically (a gradient through a softmax over one slot) comes out as roundoff.
SCALE_FLOOR = 1e-3
# Several gradients of one loss: each is compared on at least this fraction of the largest. A
# gradient far smaller than the others is a cancellation of larger terms (a cosine over D = 1
# is +-1 whatever the key), and its float32 roundoff is relative to those terms.
JOINT_SCALE_FRACTION = 1e-2


# Some cases are ill-conditioned: a content read over D = 1 differentiates a cosine that is +-1
# up to eps / (|M|^2 + eps), a cancellation that magnifies roundoff where a slot is nearly empty.
# No float32 computation can beat the error that rounding its *inputs* to float32 causes in the
# exact result, so a gradient is allowed CONDITION_MARGIN times that error (measured by
# :func:`input_rounding_sensitivity`) where it exceeds GRAD_RTOL.
CONDITION_MARGIN = 10
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def rel_err(x, ref, floor: float = SCALE_FLOOR) -> float:
    x, ref = np.asarray(x), np.asarray(ref)
    assert x.shape == ref.shape, f"shape {x.shape} != reference shape {ref.shape}"
    assert np.all(np.isfinite(x)), "non-finite values"
    if not ref.size:
        return 0.0
    scale = max(float(np.max(np.abs(ref))), floor)
    return float(np.max(np.abs(x - ref))) / scale


def grad_errors(got: dict, want: dict) -> dict[str, float]:
    """:func:`rel_err` of each gradient, floored at a fraction of the largest of them."""
    largest = max(float(np.max(np.abs(w))) for w in want.values() if np.size(w))
    floor = max(SCALE_FLOOR, JOINT_SCALE_FRACTION * largest)
    return {n: rel_err(got[n], want[n], floor) for n in want}


def input_rounding_sensitivity(grads_fn, inputs: dict, trials: int = 3, seed: int = 0) -> float:
    """How far float32 rounding of ``inputs`` moves the float64 gradients ``grads_fn(inputs)``
    (a dict): the largest :func:`grad_errors` over ``trials`` random relative perturbations of
    one float32 unit roundoff."""
    rng = np.random.default_rng(seed)
    want = grads_fn(inputs)
    worst = 0.0
    for _ in range(trials):
        moved = {
            n: x * (1 + rng.uniform(-1, 1, np.shape(x)) * FLOAT32_UNIT_ROUNDOFF)
            for n, x in inputs.items()
        }
        worst = max(worst, *grad_errors(grads_fn(moved), want).values())
    return worst


def central_difference(fn, x: np.ndarray, index: tuple, eps: complex = FD_EPS) -> float:
    """d fn / d x[index] by central differences (``x`` is restored). With an imaginary ``eps``
    (complex ``x``) the result is the derivative along the imaginary part divided by ``i``."""
    saved = x[index]
    x[index] = saved + eps
    plus = fn()
    x[index] = saved - eps
    minus = fn()
    x[index] = saved
    return (plus - minus) / (2 * eps)


# Half-precision inputs, float32 accumulation, outputs and gradients returned in the input dtype
# and compared with the float64 reference run on the same (rounded) inputs and cotangents.
# Forward: what remains is the rounding of each output to its dtype, half an ulp, 2^-9 = 2.0e-3
# relative for bfloat16 and 2^-12 = 2.4e-4 for float16; 5x margin. Gradients pass through about
# four such roundings (the forward output a backward reads back, e.g. the head scan's h; the
# cotangent computed from it; the gradient's own rounding), 8e-3 and 1e-3; 3x margin (measured:
# at most 8.2e-3 and 3.9e-4).
LOW_PRECISION_RTOL = {"bfloat16": 1e-2, "float16": 1.2e-3}
LOW_PRECISION_GRAD_RTOL = {"bfloat16": 2.5e-2, "float16": 3e-3}


def low_precision_rtol(dtype) -> tuple[float, float]:
    """(forward, gradient) tolerances for a half-precision dtype of any framework."""
    name = str(dtype).rsplit(".", 1)[-1]
    return LOW_PRECISION_RTOL[name], LOW_PRECISION_GRAD_RTOL[name]
