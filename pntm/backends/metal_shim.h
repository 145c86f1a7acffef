// The Metal Shading Language subset that pntm's kernels use, as C++17, so that the very kernel
// sources MLX compiles for Apple GPUs (mx.fast.metal_kernel) also compile and run on a CPU
// (pntm/backends/metal_emulator.py generates the function around each kernel body).
//
// * Every thread of a threadgroup is a fiber (ucontext). The threads of a group run as phases
//   between barriers: a fiber runs until it reaches threadgroup_barrier or a SIMD-group
//   function (simd_sum, simd_max), where it waits for the others. The 32 lanes of a SIMD group
//   advance together; SIMD groups are run one after another between barriers, first to last
//   and last to first on alternate phases, so that threadgroup memory read or written without
//   the barrier that orders it gives a wrong result instead of a lucky one.
// * A SIMD-group function or barrier that not every (live) lane or thread reaches is an error,
//   as is a buffer index outside the buffer: device buffers are bounds-checked views.
// * The address-space qualifiers (device, constant, thread, threadgroup) have no meaning here;
//   a threadgroup array is declared with PNTM_THREADGROUP_ARRAY (one instance per threadgroup,
//   NaN when each threadgroup starts: a read before any write shows). Every thread of a group
//   must wait at the same threadgroup_barrier call.

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

// ------------------------------------------------------------------------- vector and scalars

using uint = unsigned int;

struct uint3 {
  uint x, y, z;
};

using float16_t = _Float16;
using half = _Float16;

// bfloat16 as MLX stores it (the high half of a float32), rounded to nearest even
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() : bits(0) {}
  bfloat16_t(float value) {  // NOLINT: implicit, as in MSL
    uint32_t u;
    std::memcpy(&u, &value, 4);
    if (std::isnan(value)) {
      bits = uint16_t((u >> 16) | 0x40);
    } else {
      bits = uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float value;
    std::memcpy(&value, &u, 4);
    return value;
  }
};
using bfloat = bfloat16_t;

// ------------------------------------------------------------------------- the runtime

namespace pntm_emu {

constexpr uint SIMD_WIDTH = 32;  // Apple GPUs' thread_execution_width

// the first error of a launch (an out-of-bounds index, a divergent barrier); empty if none
inline thread_local std::string error;

inline void fail(const std::string& message);

// A device buffer: a pointer that checks every index against the buffer's element count.
template <typename T>
struct Checked {
  T* base;
  int64_t count;   // elements in the whole buffer
  int64_t offset;  // this view starts at base + offset
  const char* name;

  T& operator[](int64_t i) const {
    const int64_t at = offset + i;
    if (at < 0 || at >= count) {
      fail(std::string("out-of-bounds access to buffer '") + name + "': element " +
           std::to_string(at) + " of " + std::to_string(count));
      static thread_local typename std::remove_const<T>::type sink{};
      return sink;
    }
    return base[at];
  }
  T& operator*() const { return (*this)[0]; }
  Checked operator+(int64_t n) const { return Checked{base, count, offset + n, name}; }
  Checked operator-(int64_t n) const { return Checked{base, count, offset - n, name}; }
};

enum class Wait { running, simd, barrier, done };
enum class Op { sum, max, min };

struct Fiber {
  ucontext_t context;
  Wait wait = Wait::running;
  Op op = Op::sum;
  int line = 0;  // of the threadgroup_barrier it waits at
  bool is_float = true;
  double value = 0;   // what the lane brought to a SIMD-group function
  double result = 0;  // what it gets back
  uint3 position_in_grid{}, position_in_group{};
  uint index_in_group = 0;
};

struct Group {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  uint3 position{}, size{};           // of this group: threadgroup_position_in_grid, its threads
  uint3 grid{}, groups{}, dispatch{};  // of the launch: threads, threadgroups, threadgroup size
  std::function<void(const Fiber&)> body;
};

inline thread_local Group* group = nullptr;
// counts threadgroups: a threadgroup array is refilled with NaN when a new group first reaches it
inline thread_local uint64_t group_count = 0;

template <typename T, size_t N>
inline void fresh_threadgroup_array(T (&array)[N], uint64_t& seen) {
  if (seen != group_count) {  // Metal leaves it undefined: NaN (all bits set) shows a stale read
    seen = group_count;
    std::memset(static_cast<void*>(array), 0xFF, sizeof(array));
  }
}

inline void fail(const std::string& message) {
  if (!error.empty()) return;
  error = message;
  if (group != nullptr) {
    const Fiber& f = group->fibers[group->current];
    error += " (thread_position_in_grid (" + std::to_string(f.position_in_grid.x) + ", " +
             std::to_string(f.position_in_grid.y) + ", " + std::to_string(f.position_in_grid.z) +
             "))";
  }
}

inline void yield(Wait wait, int line = 0) {
  Fiber& f = group->fibers[group->current];
  f.wait = wait;
  f.line = line;
  swapcontext(&f.context, &group->scheduler);
}

inline double collective(Op op, bool is_float, double value) {
  Fiber& f = group->fibers[group->current];
  f.op = op;
  f.is_float = is_float;
  f.value = value;
  yield(Wait::simd);
  return f.result;
}

inline void fiber_main() {
  Fiber& f = group->fibers[group->current];
  group->body(f);
  f.wait = Wait::done;  // uc_link returns to the scheduler
}

// Resolves the SIMD-group function every live lane of [first, last) waits at; false on error.
inline bool resolve_simd(Group& g, int first, int last) {
  const Fiber& lead = g.fibers[first];
  float fsum = 0.0f;
  double acc = lead.value;
  for (int i = first; i < last; ++i) {
    const Fiber& f = g.fibers[i];
    if (f.op != lead.op || f.is_float != lead.is_float) {
      fail("lanes of one SIMD group called different SIMD-group functions");
      return false;
    }
    if (lead.op == Op::sum) {
      if (lead.is_float) {
        fsum += float(f.value);  // float arithmetic, lane order
      } else if (i > first) {
        acc += f.value;
      }
    } else if (i > first) {
      acc = lead.op == Op::max ? std::max(acc, f.value) : std::min(acc, f.value);
    }
  }
  const double result = lead.op == Op::sum && lead.is_float ? double(fsum) : acc;
  for (int i = first; i < last; ++i) {
    g.fibers[i].result = result;
    g.fibers[i].wait = Wait::running;
  }
  return true;
}

// Runs one threadgroup to completion (or to its first error).
inline void run_group(Group& g, std::vector<std::unique_ptr<char[]>>& stacks,
                      int64_t stack_bytes) {
  const int n = int(g.fibers.size());
  group = &g;
  ++group_count;
  for (int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks[i].get();
    f.context.uc_stack.ss_size = size_t(stack_bytes);
    f.context.uc_link = &g.scheduler;
    makecontext(&f.context, fiber_main, 0);
    f.wait = Wait::running;
  }
  const int n_simd = (n + int(SIMD_WIDTH) - 1) / int(SIMD_WIDTH);
  for (int phase = 0;; ++phase) {
    const bool reverse = phase % 2 == 1;
    for (int k = 0; k < n_simd && error.empty(); ++k) {
      const int s = reverse ? n_simd - 1 - k : k;
      const int first = s * int(SIMD_WIDTH), last = std::min(n, first + int(SIMD_WIDTH));
      for (;;) {  // the lanes of SIMD group s, until each waits at a barrier or is done
        for (int i = first; i < last && error.empty(); ++i) {
          if (g.fibers[i].wait == Wait::running) {
            g.current = i;
            swapcontext(&g.scheduler, &g.fibers[i].context);
          }
        }
        if (!error.empty()) break;
        int at_simd = 0;
        for (int i = first; i < last; ++i) at_simd += g.fibers[i].wait == Wait::simd;
        if (at_simd == 0) break;
        if (at_simd != last - first) {
          g.current = first;
          fail("a SIMD-group function was not reached by every lane of its SIMD group");
          break;
        }
        if (!resolve_simd(g, first, last)) break;
      }
    }
    if (!error.empty()) break;
    int done = 0;
    for (const Fiber& f : g.fibers) done += f.wait == Wait::done;
    if (done == n) break;
    if (done != 0) {
      g.current = 0;
      fail("threadgroup_barrier was not reached by every thread of the threadgroup");
      break;
    }
    for (const Fiber& f : g.fibers) {
      if (f.line != g.fibers[0].line) {
        g.current = int(&f - g.fibers.data());
        fail("threads of one threadgroup wait at different threadgroup_barrier calls (lines " +
             std::to_string(g.fibers[0].line) + " and " + std::to_string(f.line) + ")");
        break;
      }
    }
    if (!error.empty()) break;
    for (Fiber& f : g.fibers) f.wait = Wait::running;  // every thread is at the barrier
  }
  group = nullptr;
}

// dispatchThreads(grid, threadgroup), as MLX launches a custom kernel
inline int launch(const int64_t* grid, const int64_t* threadgroup,
                  const std::function<void(const Fiber&)>& body, char* message,
                  int64_t message_size, int64_t stack_bytes) {
  error.clear();
  uint3 tg{uint(std::min(threadgroup[0], grid[0])), uint(std::min(threadgroup[1], grid[1])),
           uint(std::min(threadgroup[2], grid[2]))};
  const uint3 groups{uint((grid[0] + tg.x - 1) / tg.x), uint((grid[1] + tg.y - 1) / tg.y),
                     uint((grid[2] + tg.z - 1) / tg.z)};
  std::vector<std::unique_ptr<char[]>> stacks;
  for (size_t i = 0; i < size_t(tg.x) * tg.y * tg.z; ++i) {
    stacks.emplace_back(new char[size_t(stack_bytes)]);
  }
  Group g;
  g.body = body;
  g.grid = uint3{uint(grid[0]), uint(grid[1]), uint(grid[2])};
  g.groups = groups;
  g.dispatch = tg;
  for (uint gz = 0; gz < groups.z && error.empty(); ++gz) {
    for (uint gy = 0; gy < groups.y && error.empty(); ++gy) {
      for (uint gx = 0; gx < groups.x && error.empty(); ++gx) {
        // threads past the grid's edge are not launched (a smaller group at the edge)
        const uint3 size{std::min<uint>(tg.x, uint(grid[0]) - gx * tg.x),
                         std::min<uint>(tg.y, uint(grid[1]) - gy * tg.y),
                         std::min<uint>(tg.z, uint(grid[2]) - gz * tg.z)};
        g.position = uint3{gx, gy, gz};
        g.size = size;
        g.fibers.assign(size_t(size.x) * size.y * size.z, Fiber{});
        for (uint z = 0; z < size.z; ++z) {
          for (uint y = 0; y < size.y; ++y) {
            for (uint x = 0; x < size.x; ++x) {
              const uint index = x + size.x * (y + size.y * z);
              Fiber& f = g.fibers[index];
              f.position_in_group = uint3{x, y, z};
              f.position_in_grid = uint3{gx * tg.x + x, gy * tg.y + y, gz * tg.z + z};
              f.index_in_group = index;
            }
          }
        }
        run_group(g, stacks, stack_bytes);
      }
    }
  }
  if (error.empty()) return 0;
  std::snprintf(message, size_t(message_size), "%s", error.c_str());
  return 1;
}

}  // namespace pntm_emu

// ------------------------------------------------------------------------- MSL functions

enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };

inline void threadgroup_barrier_at(int line) { pntm_emu::yield(pntm_emu::Wait::barrier, line); }
// a macro, so that each barrier knows its call site (threads must all wait at the same one)
#define threadgroup_barrier(flags) threadgroup_barrier_at(__LINE__)

inline float simd_sum(float x) {
  return float(pntm_emu::collective(pntm_emu::Op::sum, true, x));
}
inline int simd_sum(int x) { return int(pntm_emu::collective(pntm_emu::Op::sum, false, x)); }
inline float simd_max(float x) {
  return float(pntm_emu::collective(pntm_emu::Op::max, true, x));
}
inline float simd_min(float x) {
  return float(pntm_emu::collective(pntm_emu::Op::min, true, x));
}

namespace metal {
using std::abs;
using std::ceil;
using std::exp;
using std::floor;
using std::fma;
using std::isinf;
using std::isnan;
using std::log;
using std::max;
using std::min;
using std::sqrt;
using std::tanh;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float divide(float x, float y) { return x / y; }
namespace precise {
using std::exp;
using std::log;
using std::sqrt;
inline float divide(float x, float y) { return x / y; }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace precise
namespace fast = precise;  // the CPU has one accuracy
}  // namespace metal

// ------------------------------------------------------------------------- address spaces
// Last, so that no standard header above sees these names as macros.

#define device
#define constant
#define thread
#define threadgroup
#define PNTM_THREADGROUP_ARRAY(type, name, size)      \
  static thread_local type name[size];                \
  static thread_local uint64_t name##_group = 0;      \
  pntm_emu::fresh_threadgroup_array(name, name##_group)
