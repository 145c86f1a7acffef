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
