"""The Metal kernel sources of :mod:`pntm.backends.scans.metal`, as MLX takes them.

Each :class:`KernelSource` holds exactly the arguments of ``mx.fast.metal_kernel``: a name, the
input and output names, the kernel *body* (MLX writes the signature around it) and a header of
helpers. The same strings go to MLX on a Mac and to :mod:`pntm.backends.metal_emulator`
elsewhere, so they are written in the part of the Metal Shading Language that is also C++ under
``metal_shim.h``: scalar types, ``metal::`` math, ``simd_sum``/``simd_max``,
``threadgroup_barrier``, and threadgroup arrays declared with ``PNTM_THREADGROUP_ARRAY``.

Memory scan (one threadgroup per batch·head, ``SG`` SIMD groups of 32 threads): thread ``tid``
owns slots ``tid + r * 32 SG`` for ``r < R`` and keeps their ``R x D`` rows of the memory in
registers across time. A write is local to a row; what crosses rows (a read's sum over slots,
the softmax of content addressing, the erase and add gradients) is a threadgroup reduction:
``simd_sum`` within each SIMD group, then the SIMD groups' partials through threadgroup memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelSource:
    """The arguments of ``mx.fast.metal_kernel`` (and of ``EmulatedKernel``)."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str = ""

    def arguments(self) -> dict:
        return dict(
            name=self.name,
            input_names=list(self.input_names),
            output_names=list(self.output_names),
            source=self.source,
            header=self.header,
            ensure_row_contiguous=True,
        )


HEADER = r"""
#ifndef PNTM_THREADGROUP_ARRAY
#define PNTM_THREADGROUP_ARRAY(type, name, size) threadgroup type name[size]
#endif

// added inside the norms of content addressing, as pntm.backends.base.COSINE_EPS
constexpr constant float PNTM_COSINE_EPS = 1e-6f;

// Sums (MAX: maxima) over the threadgroup of the L values v[0..L) of every thread. Returns the
// totals, in threadgroup memory; they stay valid until the next group_reduce, which every
// thread of the group must reach (uniform control flow). `shared` holds
// (n_simdgroups + 1) * capacity floats, capacity >= L: the SIMD groups' partials, then the
// totals, apart, because a SIMD group may write the next reduction's partials while another
// still reads this one's totals.
template <int L, bool MAX>
inline threadgroup float* group_reduce(
    thread float* v, threadgroup float* shared, uint capacity, uint simd_group, uint lane,
    uint tid, uint n_simdgroups, uint n_threads) {
  for (int j = 0; j < L; ++j) {
    const float s = MAX ? simd_max(v[j]) : simd_sum(v[j]);
    if (lane == 0) {
      shared[simd_group * L + j] = s;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  threadgroup float* totals = shared + n_simdgroups * capacity;
  for (uint j = tid; j < uint(L); j += n_threads) {
    float total = shared[j];
    for (uint g = 1; g < n_simdgroups; ++g) {
      total = MAX ? metal::max(total, shared[g * L + j]) : total + shared[g * L + j];
    }
    totals[j] = total;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return totals;
}

// Key ``row`` (D values of any input dtype) into float q; returns sqrt(|q|^2 + eps), the norm
// the cosine uses. The buffer's type, address space included, is deduced.
template <int D, typename Buffer>
inline float load_key(Buffer key, int row, thread float* q) {
  float key_sq = 0.0f;
  for (int d = 0; d < D; ++d) {
    q[d] = float(key[row * D + d]);
    key_sq += q[d] * q[d];
  }
  return metal::precise::sqrt(key_sq + PNTM_COSINE_EPS);
}

// Content addressing over the slots this thread owns (row r of m, R x D, is slot
// tid + r * n_threads; rows past N are padding): p[r] = softmax_i(beta cos(key, M_i)) over all N
// slots of the threadgroup, with each row's cosine and norm sqrt(|M_i|^2 + eps) (the backward
// needs them). Every thread of the group must call it.
template <int R, int D>
inline void content_weights(
    thread const float* m, thread const float* key, float key_norm, float strength, int N,
    thread float* p, thread float* cosine, thread float* norm_m, threadgroup float* shared,
    uint capacity, uint simd_group, uint lane, uint tid, uint n_simdgroups, uint n_threads) {
  float top[1] = {-INFINITY};
  for (int r = 0; r < R; ++r) {
    float dot_mk = 0.0f;
    float sq = 0.0f;
    for (int d = 0; d < D; ++d) {
      dot_mk += m[r * D + d] * key[d];
      sq += m[r * D + d] * m[r * D + d];
    }
    norm_m[r] = metal::precise::sqrt(sq + PNTM_COSINE_EPS);
    cosine[r] = dot_mk / (norm_m[r] * key_norm);
    p[r] = int(tid) + r * int(n_threads) < N ? strength * cosine[r] : -INFINITY;
    top[0] = metal::max(top[0], p[r]);
  }
  const float shift = group_reduce<1, true>(
      top, shared, capacity, simd_group, lane, tid, n_simdgroups, n_threads)[0];
  float z[1] = {0.0f};
  for (int r = 0; r < R; ++r) {
    p[r] = int(tid) + r * int(n_threads) < N ? metal::precise::exp(p[r] - shift) : 0.0f;
    z[0] += p[r];
  }
  const float total = group_reduce<1, false>(
      z, shared, capacity, simd_group, lane, tid, n_simdgroups, n_threads)[0];
  for (int r = 0; r < R; ++r) {
    p[r] = p[r] / total;
  }
}
"""

# Shared by both memory kernels: who this thread is, the sizes, the threadgroup memory.
_MEMORY_PROLOGUE = r"""
  const uint tid = thread_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup;
  const uint simd_group = simdgroup_index_in_threadgroup;
  const uint n_threads = SG * 32;
  const int head = int(threadgroup_position_in_grid.y);  // b * K + k
  const int n_steps = sizes[0];
  const int N = sizes[1];
  const int K = sizes[2];
  const int chunk = sizes[3];
  const int n_checkpoints = sizes[4];
  const int b = head / K;
  const int k = head % K;
  const uint capacity = 2 * D + 2;  // the most values one reduction carries
  PNTM_THREADGROUP_ARRAY(float, shared, (SG + 1) * (2 * D + 2));
"""

MEMORY_FORWARD = KernelSource(
    name="pntm_memory_scan_read_forward",
    input_names=("w", "erase", "add", "rho", "m0", "key", "beta", "gamma", "sizes"),
    output_names=("reads", "final_memory", "checkpoints"),
    header=HEADER,
    source=_MEMORY_PROLOGUE
    + r"""
  // this thread's rows of M_0, and the first checkpoint
  float m[R * D];
  for (int r = 0; r < R; ++r) {
    const int i = int(tid) + r * int(n_threads);
    for (int d = 0; d < D; ++d) {
      m[r * D + d] = i < N ? float(m0[(head * N + i) * D + d]) : 0.0f;
      if (i < N) {
        checkpoints[(head * n_checkpoints * N + i) * D + d] = m[r * D + d];
      }
    }
  }
  for (int t = 0; t < n_steps; ++t) {
    const int row = (b * n_steps + t) * K + k;  // (b, t, k) of a (B, T, K, ...) input
    float e[D];
    float a[D];
    for (int d = 0; d < D; ++d) {
      e[d] = float(erase[row * D + d]);
      a[d] = float(add[row * D + d]);
    }
    // the write M_t = (1 - w e^T) * M_{t-1} + w a^T, and the location weighting
    float weight[R];
    for (int r = 0; r < R; ++r) {
      const int i = int(tid) + r * int(n_threads);
      const float w_i = i < N ? float(w[row * N + i]) : 0.0f;
      weight[r] = i < N ? float(rho[row * N + i]) : 0.0f;
      for (int d = 0; d < D; ++d) {
        m[r * D + d] = (1.0f - w_i * e[d]) * m[r * D + d] + w_i * a[d];
      }
    }
    if (CONTENT) {  // mix in softmax_i(beta cos(key, M_i))
      float q[D];
      const float key_norm = load_key<D>(key, row, q);
      const float strength = float(beta[row]);
      const float gate = float(gamma[row]);
      float p[R];
      float cosine[R];
      float norm_m[R];
      content_weights<R, D>(
          m, q, key_norm, strength, N, p, cosine, norm_m, shared, capacity, simd_group, lane,
          tid, SG, n_threads);
      for (int r = 0; r < R; ++r) {
        weight[r] = (1.0f - gate) * weight[r] + gate * p[r];
      }
    }
    // the read r_t = weight^T M_t: partial sums over this thread's rows, then over the group
    float part[D];
    for (int d = 0; d < D; ++d) {
      part[d] = 0.0f;
      for (int r = 0; r < R; ++r) {
        part[d] += weight[r] * m[r * D + d];
      }
    }
    threadgroup float* read_total = group_reduce<D, false>(
        part, shared, capacity, simd_group, lane, tid, SG, n_threads);
    for (int d = int(tid); d < D; d += int(n_threads)) {
      reads[row * D + d] = static_cast<T>(read_total[d]);
    }
    if ((t + 1) % chunk == 0 && (t + 1) / chunk < n_checkpoints) {
      const int c = (t + 1) / chunk;
      for (int r = 0; r < R; ++r) {
        const int i = int(tid) + r * int(n_threads);
        for (int d = 0; d < D && i < N; ++d) {
          checkpoints[((head * n_checkpoints + c) * N + i) * D + d] = m[r * D + d];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int i = int(tid) + r * int(n_threads);
    for (int d = 0; d < D && i < N; ++d) {
      final_memory[(head * N + i) * D + d] = static_cast<T>(m[r * D + d]);
    }
  }
""",
)

MEMORY_BACKWARD = KernelSource(
    name="pntm_memory_scan_read_backward",
    input_names=(
        "w",
        "erase",
        "add",
        "rho",
        "key",
        "beta",
        "gamma",
        "checkpoints",
        "d_reads",
        "d_final",
        "sizes",
    ),
    output_names=(
        "d_w",
        "d_erase",
        "d_add",
        "d_rho",
        "d_key",
        "d_beta",
        "d_gamma",
        "d_m0",
        "states",
    ),
    header=HEADER,
    source=_MEMORY_PROLOGUE
    + r"""
  // G = dL/dM_t for this thread's rows, from the final memory's cotangent
  float g[R][D];
  for (int r = 0; r < R; ++r) {
    const int i = int(tid) + r * int(n_threads);
    for (int d = 0; d < D; ++d) {
      g[r][d] = i < N ? float(d_final[(head * N + i) * D + d]) : 0.0f;
    }
  }
  // `states` holds min(chunk, T) + 1 states per threadgroup: M_{t0} .. M_{t1} of the current chunk,
  // each thread its own rows (so no barrier orders them)
  const int span = metal::min(chunk, n_steps) + 1;
  for (int c = n_checkpoints - 1; c >= 0; --c) {
    const int t0 = c * chunk;
    const int t1 = metal::min(t0 + chunk, n_steps);
    for (int r = 0; r < R; ++r) {
      const int i = int(tid) + r * int(n_threads);
      if (i >= N) {
        continue;
      }
      float m[D];
      for (int d = 0; d < D; ++d) {
        m[d] = checkpoints[((head * n_checkpoints + c) * N + i) * D + d];
        states[((head * span) * N + i) * D + d] = m[d];
      }
      for (int t = t0; t < t1; ++t) {
        const int row = (b * n_steps + t) * K + k;
        const float w_i = float(w[row * N + i]);
        for (int d = 0; d < D; ++d) {
          m[d] = (1.0f - w_i * float(erase[row * D + d])) * m[d] + w_i * float(add[row * D + d]);
          states[((head * span + t - t0 + 1) * N + i) * D + d] = m[d];
        }
      }
    }
    for (int t = t1 - 1; t >= t0; --t) {
      const int row = (b * n_steps + t) * K + k;
      const int s = t - t0 + 1;  // M_t is states[s], M_{t-1} states[s - 1]
      float dr[D];
      for (int d = 0; d < D; ++d) {
        dr[d] = float(d_reads[row * D + d]);
      }
      float mt[R * D];
      float weight[R];
      float d_mix[R];  // d(read)/d(weight_i) = <M_t(i), dr>
      for (int r = 0; r < R; ++r) {
        const int i = int(tid) + r * int(n_threads);
        weight[r] = i < N ? float(rho[row * N + i]) : 0.0f;
        d_mix[r] = 0.0f;
        for (int d = 0; d < D; ++d) {
          mt[r * D + d] = i < N ? states[((head * span + s) * N + i) * D + d] : 0.0f;
          d_mix[r] += mt[r * D + d] * dr[d];
        }
      }
      float grad_rho[R];
      for (int r = 0; r < R; ++r) {
        grad_rho[r] = d_mix[r];
      }
      if (CONTENT) {  // reverse mode of the content read (read_step_vjp of pntm.backends.base)
        float q[D];
        const float key_norm = load_key<D>(key, row, q);
        const float strength = float(beta[row]);
        const float gate = float(gamma[row]);
        float p[R];
        float cosine[R];
        float norm_m[R];
        content_weights<R, D>(
            mt, q, key_norm, strength, N, p, cosine, norm_m, shared, capacity, simd_group,
            lane, tid, SG, n_threads);
        // [d_gamma, sum_i p_i d_content_i]
        float sums[2] = {0.0f, 0.0f};
        for (int r = 0; r < R; ++r) {
          sums[0] += d_mix[r] * (p[r] - weight[r]);
          sums[1] += p[r] * gate * d_mix[r];
          grad_rho[r] = (1.0f - gate) * d_mix[r];
          weight[r] = (1.0f - gate) * weight[r] + gate * p[r];
        }
        threadgroup float* gated = group_reduce<2, false>(
            sums, shared, capacity, simd_group, lane, tid, SG, n_threads);
        const float d_gate = gated[0];
        const float p_dot = gated[1];
        // [d_key's first term (D), d_beta, sum_i d_cos_i cos_i]
        float kv[D + 2];
        for (int d = 0; d < D + 2; ++d) {
          kv[d] = 0.0f;
        }
        for (int r = 0; r < R; ++r) {
          const float d_logit = p[r] * (gate * d_mix[r] - p_dot);
          const float d_cos = strength * d_logit;
          const float inv = d_cos / (norm_m[r] * key_norm);
          const float shrink = d_cos * cosine[r] / (norm_m[r] * norm_m[r]);
          for (int d = 0; d < D; ++d) {
            kv[d] += inv * mt[r * D + d];
            g[r][d] += inv * q[d] - shrink * mt[r * D + d];
          }
          kv[D] += d_logit * cosine[r];
          kv[D + 1] += d_cos * cosine[r];
        }
        threadgroup float* keyed = group_reduce<D + 2, false>(
            kv, shared, capacity, simd_group, lane, tid, SG, n_threads);
        for (int d = int(tid); d < D; d += int(n_threads)) {
          d_key[row * D + d] =
              static_cast<T>(keyed[d] - keyed[D + 1] * q[d] / (key_norm * key_norm));
        }
        if (tid == 0) {
          d_beta[row] = static_cast<T>(keyed[D]);
          d_gamma[row] = static_cast<T>(d_gate);
        }
      }
      // G_t += weight dr^T; then the write's gradients from M_{t-1}, and G_{t-1} = F_t * G_t
      float ea[2 * D];
      for (int d = 0; d < 2 * D; ++d) {
        ea[d] = 0.0f;
      }
      for (int r = 0; r < R; ++r) {
        const int i = int(tid) + r * int(n_threads);
        const float w_i = i < N ? float(w[row * N + i]) : 0.0f;
        float grad_w = 0.0f;
        for (int d = 0; d < D; ++d) {
          g[r][d] += weight[r] * dr[d];
          const float prev = i < N ? states[((head * span + s - 1) * N + i) * D + d] : 0.0f;
          const float e_d = float(erase[row * D + d]);
          const float g_prev = g[r][d] * prev;
          grad_w += g[r][d] * float(add[row * D + d]) - g_prev * e_d;
          ea[d] -= w_i * g_prev;
          ea[D + d] += w_i * g[r][d];
          g[r][d] = (1.0f - w_i * e_d) * g[r][d];
        }
        if (i < N) {
          d_w[row * N + i] = static_cast<T>(grad_w);
          d_rho[row * N + i] = static_cast<T>(grad_rho[r]);
        }
      }
      threadgroup float* written = group_reduce<2 * D, false>(
          ea, shared, capacity, simd_group, lane, tid, SG, n_threads);
      for (int d = int(tid); d < D; d += int(n_threads)) {
        d_erase[row * D + d] = static_cast<T>(written[d]);
        d_add[row * D + d] = static_cast<T>(written[D + d]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int i = int(tid) + r * int(n_threads);
    for (int d = 0; d < D && i < N; ++d) {
      d_m0[(head * N + i) * D + d] = static_cast<T>(g[r][d]);
    }
  }
""",
)

LINEAR_FORWARD = KernelSource(
    name="pntm_linear_scan_forward",
    input_names=("a_re", "a_im", "b_re", "b_im", "h0_re", "h0_im", "sizes"),
    output_names=("h_re", "h_im"),
    header=HEADER,
    source=r"""
  // one thread per (batch, channel): h_t = a_t h_{t-1} + b_t, complex as (re, im) pairs
  const int channel = int(thread_position_in_grid.x);
  const int b = int(thread_position_in_grid.y);
  const int n_steps = sizes[0];
  const int C = sizes[1];
  if (channel >= C) {
    return;
  }
  float hr = float(h0_re[b * C + channel]);
  float hi = COMPLEX ? float(h0_im[b * C + channel]) : 0.0f;
  for (int t = 0; t < n_steps; ++t) {
    const int at = (b * n_steps + t) * C + channel;
    const float ar = float(a_re[at]);
    if (COMPLEX) {
      const float ai = float(a_im[at]);
      const float next_r = ar * hr - ai * hi + float(b_re[at]);
      hi = ar * hi + ai * hr + float(b_im[at]);
      hr = next_r;
      h_im[at] = static_cast<T>(hi);
    } else {
      hr = ar * hr + float(b_re[at]);
    }
    h_re[at] = static_cast<T>(hr);
  }
""",
)

LINEAR_BACKWARD = KernelSource(
    name="pntm_linear_scan_backward",
    input_names=("a_re", "a_im", "h_re", "h_im", "h0_re", "h0_im", "d_h_re", "d_h_im", "sizes"),
    output_names=("d_a_re", "d_a_im", "d_b_re", "d_b_im", "d_h0_re", "d_h0_im"),
    header=HEADER,
    source=r"""
  // the same scan backwards in time: g_t = d_h_t + conj(a_{t+1}) g_{t+1}; db_t = g_t,
  // da_t = g_t conj(h_{t-1}), dh0 = conj(a_1) g_1
  const int channel = int(thread_position_in_grid.x);
  const int b = int(thread_position_in_grid.y);
  const int n_steps = sizes[0];
  const int C = sizes[1];
  if (channel >= C) {
    return;
  }
  float gr = 0.0f;
  float gi = 0.0f;
  for (int t = n_steps - 1; t >= 0; --t) {
    const int at = (b * n_steps + t) * C + channel;
    const int before = at - C;  // h_{t-1}, for t > 0
    gr += float(d_h_re[at]);
    const float prev_r = t > 0 ? float(h_re[before]) : float(h0_re[b * C + channel]);
    const float ar = float(a_re[at]);
    if (COMPLEX) {
      gi += float(d_h_im[at]);
      const float prev_i = t > 0 ? float(h_im[before]) : float(h0_im[b * C + channel]);
      const float ai = float(a_im[at]);
      d_b_re[at] = static_cast<T>(gr);
      d_b_im[at] = static_cast<T>(gi);
      d_a_re[at] = static_cast<T>(gr * prev_r + gi * prev_i);  // g conj(h_{t-1})
      d_a_im[at] = static_cast<T>(gi * prev_r - gr * prev_i);
      const float next_r = ar * gr + ai * gi;  // conj(a_t) g
      gi = ar * gi - ai * gr;
      gr = next_r;
    } else {
      d_b_re[at] = static_cast<T>(gr);
      d_a_re[at] = static_cast<T>(gr * prev_r);
      gr = ar * gr;
    }
  }
  d_h0_re[b * C + channel] = static_cast<T>(gr);
  if (COMPLEX) {
    d_h0_im[b * C + channel] = static_cast<T>(gi);
  }
""",
)

KERNELS = (MEMORY_FORWARD, MEMORY_BACKWARD, LINEAR_FORWARD, LINEAR_BACKWARD)
