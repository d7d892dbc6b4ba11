// bnlab's CPU fast path for Batch Normalization (training forward, backward, eval) and fused
// BN + activation. The readable definition is bnlab/functional.py; tests hold this equal to it.
//
// Memory is the cost: training forward must read x and write y, backward read x, dy and write
// dx. So:
//  * statistics in one pass over memory, never E[x²] − E[x]²: NCHW runs of L values (in cache)
//    by the corrected two-pass algorithm (Chan, Golub & LeVeque 1983: a first pass for the run's
//    mean m̃, then d = x − m̃ with M2 = Σd² − (Σd)²/n and mean = m̃ + Σd/n, which cancels the
//    rounding error of m̃); rows-layout chunks in one pass shifted by the running mean (see
//    stats_rows for why that is as accurate); partial (n, mean, M2) merged per thread with Chan's
//    update in double precision, threads merged at the end;
//  * normalize in one pass: y = x·α + b per channel (α = γ·invstd, b = β − μ·α);
//  * backward: one pass for Σdy and Σdy·(x − μ), one pass for dx = dy·k1 + x·k2 + k3;
//  * fresh large outputs are allocated 2 MiB-aligned and madvised for transparent huge pages —
//    otherwise first touch page-faults every 4 KiB page (~13 ms per 64 MB on this machine) —
//    and pooled; outputs too large to stay cached with the pass's inputs are streamed;
//  * per-thread scratch is thread_local and reused across calls.
// Two layouts: (N, C, L) contiguous (NCHW, NCL) and (M, C) rows (2-D input, channels_last).
// Threads come from ATen's pool (at::parallel_for), so torch.set_num_threads applies.

#include <torch/extension.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/Parallel.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <c10/util/BFloat16.h>
#include <c10/core/CPUAllocator.h>

#include <sys/mman.h>
#include <unistd.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BNLAB_STREAM 1
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kHugePage = 2 << 20;

enum Act { kIdentity = 0, kRelu = 1, kLeakyRelu = 2 };
// Outputs at least this large come from bnlab's pool of huge-page regions. A training step
// keeps y and dx alive together; glibc then trims the freed top of its heap and the next step
// page-faults every 4 KiB page of both again (~5 ms per 25 MB here). The pool keeps freed
// regions mapped (and faulted in) and hands them to the next output of a similar size: no
// fault, no zeroing — the "no buffer that can be reused is re-allocated" rule applied to outputs.
constexpr int64_t kPoolMin = 1 << 20;

struct Region { void* ptr; int64_t len; };
std::mutex pool_mutex;
std::vector<Region> pool;          // free regions, kept mapped
int64_t pool_bytes = 0;
int64_t pool_cap() {
  static const int64_t cap = [] {
    const char* env = std::getenv("BNLAB_KERNEL_CACHE_MB");
    return (env ? std::atoll(env) : 1024LL) << 20;
  }();
  return cap;
}

void* map_region(int64_t len) {
  void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > start) munmap(raw, aligned - start);                          // trim the head
  const uintptr_t end = start + len + kHugePage;
  if (end > aligned + len) munmap(reinterpret_cast<void*>(aligned + len), end - aligned - len);
  void* ptr = reinterpret_cast<void*>(aligned);
  madvise(ptr, len, MADV_HUGEPAGE);
  return ptr;
}

void release_region(void* ptr, int64_t len) {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (pool_bytes + len <= pool_cap()) {
    pool.push_back({ptr, len});
    pool_bytes += len;
  } else {
    munmap(ptr, len);
  }
}

Region acquire_region(int64_t bytes) {
  const int64_t len = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  {
    std::lock_guard<std::mutex> lock(pool_mutex);
    // best fit within 25%; among equal fits the most recently freed, whose lines may still be
    // in cache (scanning from the back: the pool is in order of release)
    int best = -1;
    for (int i = int(pool.size()) - 1; i >= 0; --i) {
      if (pool[i].len >= len && pool[i].len <= len + len / 4 && (best < 0 || pool[i].len < pool[best].len)) best = i;
    }
    if (best >= 0) {
      Region r = pool[best];
      pool.erase(pool.begin() + best);
      pool_bytes -= r.len;
      return r;
    }
  }
  return {map_region(len), len};
}

// The pool as a c10::Allocator, so that an output's storage is an ordinary resizable one: code
// that frees or grows a tensor's memory in place (storage().resize_(0), the FSDP/offload idiom)
// works on bnlab's outputs as on torch's. Freeing hands the region back to the pool.
struct PooledRegion { void* ptr; int64_t len; };

void delete_pooled(void* ctx) {
  auto* r = static_cast<PooledRegion*>(ctx);
  release_region(r->ptr, r->len);
  delete r;
}

struct PoolAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (int64_t(n) >= kPoolMin) {
      Region r = acquire_region(int64_t(n));
      if (r.ptr != nullptr) return {r.ptr, new PooledRegion{r.ptr, r.len}, &delete_pooled, c10::Device(c10::kCPU)};
    }
    return c10::GetCPUAllocator()->allocate(n);        // small, or no region could be mapped
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count) std::memcpy(dest, src, count);
  }
};

PoolAllocator& pool_allocator() {
  static PoolAllocator* allocator = new PoolAllocator();   // never destroyed: storages may outlive us
  return *allocator;
}

at::Tensor empty_out(const at::Tensor& like, at::ScalarType dtype) {
  const int64_t bytes = like.numel() * c10::elementSize(dtype);
  if (bytes < kPoolMin) {
    return at::empty_like(like, like.options().dtype(dtype), like.suggest_memory_format());
  }
  PoolAllocator& allocator = pool_allocator();
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, allocator.allocate(size_t(bytes)), &allocator,
                       /*resizable=*/true);
  // as at::empty does: a CPU TensorImpl over the storage, then the sizes and strides of `like`
  at::Tensor out = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                            c10::scalarTypeToTypeMeta(dtype));
  out.unsafeGetTensorImpl()->set_sizes_and_strides(like.sizes(), like.strides());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

struct Layout {
  bool rows;     // true: (M, C) rows; false: (N, C, L) contiguous
  int64_t N, C, L, M;
};

Layout layout_of(const at::Tensor& x) {
  Layout l;
  l.C = x.size(1);
  l.N = x.size(0);
  l.L = x.numel() / std::max<int64_t>(1, l.N * l.C);
  if (x.dim() == 2 || l.L == 1) {
    TORCH_CHECK(x.is_contiguous(), "bnlab kernel: 2-D input must be contiguous");
    l.rows = true;
    l.M = l.N * l.L;
  } else if (x.is_contiguous()) {
    l.rows = false;
    l.M = l.N * l.L;
  } else if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
             (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    l.rows = true;
    l.M = l.N * l.L;
  } else {
    TORCH_CHECK(false, "bnlab kernel: input must be contiguous or channels_last");
  }
  return l;
}

// The per-channel arrays the inner loops stream through next to the data (accumulators, shifts,
// tiled coefficients) start on a cache line: std::vector's 16-byte alignment would split every
// 64-byte vector access across two lines (measured: statistics pass 4–17% and the channels_last
// normalize up to 30% slower; `bnlab bench passes`).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U> Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U> bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U> bool operator!=(const Aligned64<U>&) const { return false; }
};
template <typename T> using avec = std::vector<T, Aligned64<T>>;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// 64-byte vectors (GCC vector extension: unaligned, may alias the element type)
template <typename T> struct V64;
template <> struct V64<float> {
  typedef float v __attribute__((vector_size(64), aligned(4), may_alias));
  static constexpr int n = 16;
};
template <> struct V64<double> {
  typedef double v __attribute__((vector_size(64), aligned(8), may_alias));
  static constexpr int n = 8;
};

// Chan et al.: merge (n_b, mean_b, m2_b) into (n, mean, m2).
inline void chan(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
  if (nb == 0) return;
  const double tot = n + nb;
  const double delta = mb - mean;
  mean += delta * (nb / tot);
  m2 += m2b + delta * delta * (n * nb / tot);
  n = tot;
}

struct Moments {
  std::vector<double> n, mean, m2;    // per channel (n identical in the rows layout)
  void reset(int64_t C) { n.assign(C, 0.0); mean.assign(C, 0.0); m2.assign(C, 0.0); }
};

// Per-thread accumulators that stay allocated on the calling thread between calls: the statistics
// and gradient sums of a small slice (a virtual batch of 32 rows) otherwise paid a malloc per
// buffer per call. The pass's workers write into the caller's buffers by reference; no function
// holding one calls another that takes the same one.
inline std::vector<Moments>& moments_scratch(int nt, int64_t C) {
  thread_local std::vector<Moments> per;
  per.resize(nt);
  for (auto& p : per) p.reset(C);
  return per;
}

inline std::vector<std::vector<double>>& sums_scratch(int which, int nt, int64_t C) {
  thread_local std::vector<std::vector<double>> sums[2];
  auto& v = sums[which];
  v.resize(nt);
  for (auto& t : v) t.assign(C, 0.0);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

// Rows layout, (M, C) with channels contiguous. Every pass reads rows in memory order (four rows
// at a time, so the hardware prefetcher follows four sequential streams), the per-channel
// accumulators of a chunk held in L1-resident arrays. Statistics per thread:
//  * the thread's first chunk of R rows by the corrected two-pass algorithm (in cache);
//  * every later chunk in ONE pass, shifted by the thread's running mean K (from the double
//    accumulators): d = x − K, mean_b = K + Σd/n_b, M2_b = Σd² − (Σd)²/n_b, then Chan's merge.
//    The rounding error of M2_b is ≈ ε·Σd² = ε·(M2_b + n_b·(mean_b − K)²), and the second term
//    is (up to the factor (n_a + n_b)/n_a ≤ 2 for n_a ≥ n_b) exactly the between-chunk term Chan's
//    merge adds to the total M2 — so the shift costs at most a few ε relative to the result, for
//    any data, sorted or not (never E[x²] − E[x]²).
//  * narrow rows (small C) are taken k at a time as one "wide row" of W = k·C values, the
//    accumulators tiled k times and folded per chunk — the inner loops then run W long, not C.
constexpr int64_t kWideElems = 512;       // a wide row holds at least this many values (if C allows)
constexpr int64_t kChunkRows = 64;        // wide rows per chunk: each float accumulator sums ≤ 64 terms

struct Wide {
  int64_t k, W, R;                        // rows per wide row, its width k·C, rows per chunk (k·kChunkRows)
};

inline Wide wide_rows(int64_t C) {
  const int64_t k = std::max<int64_t>(1, kWideElems / std::max<int64_t>(1, C));
  return {k, k * C, k * kChunkRows};
}

// a[0, C) copied to a[j·C, (j + 1)·C) for j = 1 … k − 1 (a tiled accumulator's shift or mean)
template <typename T>
inline void tile(T* a, int64_t C, int64_t k) {
  for (int64_t j = 1; j < k; ++j) std::copy(a, a + C, a + j * C);
}

// a[c] += Σ_{j ≥ 1} a[j·C + c]: the k copies of a tiled accumulator folded into the first
template <typename T>
inline void fold(T* a, int64_t C, int64_t k) {
  for (int64_t j = 1; j < k; ++j)
    for (int64_t c = 0; c < C; ++c) a[c] += a[j * C + c];
}

// s[c] += Σ_r (x[r][c] − K[c]) and q[c] += Σ_r (x[r][c] − K[c])² over rows [r0, r1) of width W
// (a wide row, or one row of C values)
template <typename acc_t, typename scalar_t>
inline void shifted_sums_rows(const scalar_t* __restrict x, int64_t W, int64_t r0, int64_t r1,
                              const acc_t* __restrict K, acc_t* __restrict s, acc_t* __restrict q) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const scalar_t* __restrict x0 = x + r * W;
    const scalar_t* __restrict x1 = x0 + W;
    const scalar_t* __restrict x2 = x1 + W;
    const scalar_t* __restrict x3 = x2 + W;
    for (int64_t c = 0; c < W; ++c) {
      const acc_t k = K[c];
      const acc_t d0 = acc_t(x0[c]) - k, d1 = acc_t(x1[c]) - k, d2 = acc_t(x2[c]) - k, d3 = acc_t(x3[c]) - k;
      s[c] += (d0 + d1) + (d2 + d3);
      q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; r < r1; ++r) {
    const scalar_t* __restrict xr = x + r * W;
    for (int64_t c = 0; c < W; ++c) {
      const acc_t d = acc_t(xr[c]) - K[c];
      s[c] += d;
      q[c] += d * d;
    }
  }
}

template <typename acc_t, typename scalar_t>
inline void column_sums_rows(const scalar_t* __restrict x, int64_t W, int64_t r0, int64_t r1, acc_t* __restrict s) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const scalar_t* __restrict x0 = x + r * W;
    for (int64_t c = 0; c < W; ++c)
      s[c] += (acc_t(x0[c]) + acc_t(x0[W + c])) + (acc_t(x0[2 * W + c]) + acc_t(x0[3 * W + c]));
  }
  for (; r < r1; ++r)
    for (int64_t c = 0; c < W; ++c) s[c] += acc_t(x[r * W + c]);
}

// The rows [r0, r1) of a chunk as full wide rows of width W (accumulators tiled k times), then the
// remaining < k rows with width C into the first copy; fold() afterwards.
template <typename F>
inline void wide_chunk(const Wide& w, int64_t C, int64_t r0, int64_t r1, F&& rows) {
  const int64_t full = (r1 - r0) / w.k;
  rows(r0, full, w.W);                                  // full wide rows starting at row r0
  if (r0 + full * w.k < r1) rows(r0 + full * w.k, r1 - r0 - full * w.k, C);
}

// A chunk's shifted sums (s = Σd, q = Σd² with d = x − K, n_b rows) merged into a thread's moments:
// mean_b = K + Σd/n_b, M2_b = Σd² − (Σd)²/n_b, then Chan's merge with weights shared by all
// channels; K becomes the thread's running mean (the next chunk's shift).
template <typename acc_t>
inline void merge_chunk(Moments& acc, acc_t* K, const acc_t* s, const acc_t* q, int64_t C, double nb) {
  const double na = acc.n[0], tot = na + nb;
  const double wb = nb / tot, wab = na * nb / tot, inv_nb = 1.0 / nb;
  double* __restrict am = acc.mean.data();
  double* __restrict a2 = acc.m2.data();
  for (int64_t c = 0; c < C; ++c) {
    const double ds = double(s[c]);
    const double mb = double(K[c]) + ds * inv_nb, m2b = double(q[c]) - ds * ds * inv_nb;
    const double delta = mb - am[c];
    am[c] += delta * wb;
    a2[c] += m2b + delta * delta * wab;
    K[c] = acc_t(am[c]);
  }
  std::fill(acc.n.begin(), acc.n.end(), tot);
}

// The threads' moments by Chan's merge; n is the same for every channel here, so the weights are
// the thread's and the channel loop vectorizes.
inline void merge_threads(const std::vector<Moments>& per, int64_t C, double* mean_out, double* m2_out) {
  std::fill(mean_out, mean_out + C, 0.0);
  std::fill(m2_out, m2_out + C, 0.0);
  double n = 0;
  for (const auto& p : per) {
    const double nb = p.n[0];
    if (nb == 0) continue;
    const double tot = n + nb, wb = nb / tot, wab = n * nb / tot;
    const double* __restrict pm = p.mean.data();
    const double* __restrict p2 = p.m2.data();
    for (int64_t c = 0; c < C; ++c) {
      const double delta = pm[c] - mean_out[c];
      mean_out[c] += delta * wb;
      m2_out[c] += p2[c] + delta * delta * wab;
    }
    n = tot;
  }
}

// A chunk with no earlier one (an empty accumulator): Chan's merge reduces to mean = K + Σd/n_b,
// M2 = Σd² − (Σd)²/n_b, written straight to the outputs.
template <typename acc_t>
inline void chunk_moments(const acc_t* K, const acc_t* s, const acc_t* q, int64_t C, double nb, double* mean_out,
                          double* m2_out) {
  const double inv_nb = 1.0 / nb;
  for (int64_t c = 0; c < C; ++c) {
    const double ds = double(s[c]);
    mean_out[c] = double(K[c]) + ds * inv_nb;
    m2_out[c] = double(q[c]) - ds * ds * inv_nb;
  }
}

// s, q ← the sums of rows [r0, r1) shifted by K (wide rows, folded to C); first: K ← the rows' own
// mean before, by a pass of its own
template <typename acc_t, typename scalar_t>
void wide_chunk_sums(const scalar_t* x, int64_t C, const Wide& w, int64_t r0, int64_t r1, bool first, acc_t* K,
                     acc_t* s, acc_t* q) {
  if (first) {
    std::fill(s, s + w.W, acc_t(0));
    wide_chunk(w, C, r0, r1, [&](int64_t r, int64_t n, int64_t width) {
      column_sums_rows<acc_t, scalar_t>(x + r * C, width, 0, n, s);
    });
    fold(s, C, w.k);
    const acc_t inv = acc_t(1) / acc_t(r1 - r0);
    for (int64_t c = 0; c < C; ++c) K[c] = s[c] * inv;
  }
  tile(K, C, w.k);
  std::fill(s, s + w.W, acc_t(0));
  std::fill(q, q + w.W, acc_t(0));
  wide_chunk(w, C, r0, r1, [&](int64_t r, int64_t n, int64_t width) {
    shifted_sums_rows<acc_t, scalar_t>(x + r * C, width, 0, n, K, s, q);
  });
  fold(s, C, w.k);
  fold(q, C, w.k);
}

template <typename scalar_t>
void stats_rows_wide(const scalar_t* x, const Layout& l, double* mean_out, double* m2_out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t C = l.C, M = l.M;
  const Wide w = wide_rows(C);
  const int64_t R = w.R;
  // this thread's accumulators (the workers' lambda below names them without a capture: each its own)
  thread_local avec<acc_t> K, s, q;
  if (M <= R) {                   // one chunk (a virtual batch): no per-thread accumulators to clear and merge
    K.resize(w.W), s.resize(w.W), q.resize(w.W);
    wide_chunk_sums<acc_t>(x, C, w, 0, M, true, K.data(), s.data(), q.data());
    return chunk_moments(K.data(), s.data(), q.data(), C, double(M), mean_out, m2_out);
  }
  const int nt = at::get_num_threads();
  std::vector<Moments>& per = moments_scratch(nt, C);
  at::parallel_for(0, (M + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
    Moments& acc = per[at::get_thread_num()];
    K.resize(w.W), s.resize(w.W), q.resize(w.W);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * R, r1 = std::min(M, r0 + R);
      // a wide row starting at row r: W = k·C values, row r·C onwards (the same memory as k rows)
      wide_chunk_sums<acc_t>(x, C, w, r0, r1, acc.n[0] == 0, K.data(), s.data(), q.data());
      merge_chunk(acc, K.data(), s.data(), q.data(), C, double(r1 - r0));
    }
  });
  merge_threads(per, C, mean_out, m2_out);
}

// Rows layout with C a multiple of the vector width (the common channels_last case): every row read
// in memory order, one after another, with the accumulators of a tile of channels in registers.
// The wide-row loops above keep theirs in L1 arrays — two loads and two stores beside every four
// data vectors — and those accesses crowd the loads that miss out of the core's window: on
// (64, 64, 28, 28) channels_last, read from L3/DRAM as in a network, the statistics pass ran at
// 2.4× a plain sum's time on one thread, this loop at 1.4× (`bnlab bench passes`). A row wider than
// one tile (C > kRowTile vectors) is walked a block of about kTileBlockBytes at a time, each tile
// over the block, the block's later tiles reading it from L1; the next block is prefetched while
// the first tile walks this one. Wider rows (see rows_tiled) keep the wide-row loops.
#if defined(__AVX512F__)
constexpr int kRowTile = 8;               // 64-byte vectors per tile: 3·8 of the 32 zmm registers
#else
constexpr int kRowTile = 2;               // a 64-byte vector is two of the 16 ymm registers
#endif
constexpr int64_t kTileBlockBytes = 16384;

// one vector of acc_t values from V64<acc_t>::n consecutive scalar_t values (a bfloat16 is the upper
// half of a float's bits)
template <typename scalar_t> struct VLoad {
  using vec = typename V64<typename Acc<scalar_t>::type>::v;
  static vec load(const scalar_t* p) { return *reinterpret_cast<const vec*>(p); }
};
template <> struct VLoad<c10::BFloat16> {
  typedef uint16_t h16 __attribute__((vector_size(32), aligned(2), may_alias));
  typedef uint32_t w16 __attribute__((vector_size(64)));
  using vec = V64<float>::v;
  static vec load(const c10::BFloat16* p) {
    return (vec)(__builtin_convertvector(*reinterpret_cast<const h16*>(p), w16) << 16);
  }
};

// The tiles win up to rows of 1 KiB of accumulators (C ≤ 256 floats: `bnlab bench batchnorm`'s 2-D
// (4096, 1024) and (4096, 4096) ran 1.1–1.8× slower on them, one or a few rows a block, than on the
// wide rows, which keep four rows in flight)
template <typename acc_t>
inline bool rows_tiled(int64_t C) { return C % V64<acc_t>::n == 0 && C * int64_t(sizeof(acc_t)) <= 1024; }

// f(std::integral_constant<int, NV>) for the runtime count nv ∈ [1, NV]
template <int NV, typename F>
inline void with_tile(int nv, F&& f) {
  if constexpr (NV > 1) {
    if (nv < NV) return with_tile<NV - 1>(nv, f);
  }
  f(std::integral_constant<int, NV>{});
}

// body(c0, nv) over the channel tiles of a row: T vectors of acc_t each, the last one nv ≤ T
template <typename acc_t, int T = kRowTile, typename F>
inline void channel_tiles(int64_t C, F&& body) {
  constexpr int64_t L = V64<acc_t>::n;
  for (int64_t c = 0; c < C; c += T * L) body(c, int(std::min<int64_t>(T, (C - c) / L)));
}

// rows [r0, r1) of rows of C values (bytes_per_row = C·sizeof(element) summed over the streams):
// body(r, n) over blocks; with several tiles a row, blocks of ≈ kTileBlockBytes, the next one
// prefetched (into L2) from each stream
template <typename F>
inline void row_blocks(int64_t r0, int64_t r1, int64_t C, int64_t tile_elems,
                       std::initializer_list<std::pair<const char*, int64_t>> streams, F&& body) {
  if (C <= tile_elems) return body(r0, r1 - r0);                  // one tile: a sequential walk
  int64_t row_bytes = 0;
  for (const auto& st : streams) row_bytes = std::max(row_bytes, C * st.second);
  const int64_t B = std::max<int64_t>(1, kTileBlockBytes / row_bytes);
  for (int64_t r = r0; r < r1; r += B) {
    const int64_t n = std::min(B, r1 - r), next = std::min(B, r1 - r - n);
    for (const auto& st : streams) {
      const char* p = st.first + (r + n) * C * st.second;
      const char* e = p + next * C * st.second;
      for (; p < e; p += 64) __builtin_prefetch(p, 0, 2);
    }
    body(r, n);
  }
}

// body(r, n, c, NV) for every tile of rows [r0, r1): the blocks of row_blocks, each split into
// channel tiles of T vectors of acc_t (NV: the tile's vector count, an std::integral_constant)
template <typename acc_t, int T, typename F>
inline void row_tiles(int64_t r0, int64_t r1, int64_t C, std::initializer_list<std::pair<const char*, int64_t>> streams,
                      F&& body) {
  row_blocks(r0, r1, C, T * V64<acc_t>::n, streams, [&](int64_t r, int64_t n) {
    channel_tiles<acc_t, T>(C, [&](int64_t c, int nv) { with_tile<T>(nv, [&](auto NV) { body(r, n, c, NV); }); });
  });
}

// dst[0 … NV) ← the NV 64-byte vectors of T at p (a tile's per-channel constants)
template <int NV, typename T>
inline void load_tile(typename V64<T>::v (&dst)[NV], const T* p) {
  for (int v = 0; v < NV; ++v) dst[v] = *reinterpret_cast<const typename V64<T>::v*>(p + v * V64<T>::n);
}

// s[c] += Σ_r (x[r][c] − K[c]), q[c] += Σ_r (x[r][c] − K[c])² over n rows of C values, for the NV
// vectors of channels from x, K, s, q (all offset to the tile's first channel)
template <int NV, typename scalar_t, typename acc_t>
inline void shifted_sums_tile(const scalar_t* __restrict x, int64_t C, int64_t n, const acc_t* __restrict K,
                              acc_t* __restrict s, acc_t* __restrict q) {
  using vec = typename V64<acc_t>::v;
  constexpr int L = V64<acc_t>::n;
  vec k[NV], a[NV] = {}, b[NV] = {};
  load_tile(k, K);
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* __restrict xr = x + r * C;
    for (int v = 0; v < NV; ++v) {
      const vec d = VLoad<scalar_t>::load(xr + v * L) - k[v];
      a[v] += d;
      b[v] += d * d;
    }
  }
  for (int v = 0; v < NV; ++v) {
    *reinterpret_cast<vec*>(s + v * L) += a[v];
    *reinterpret_cast<vec*>(q + v * L) += b[v];
  }
}

// stats_rows_wide's algorithm (first chunk two-pass, later chunks shifted by the running mean, Chan's
// merge) on chunks of kChunkRows rows: each float accumulator sums ≤ 64 terms
// s, q ← the sums of rows [r0, r1) of C values shifted by K, on register tiles; first: K ← the rows'
// own mean before, by a pass of its own
template <typename acc_t, typename scalar_t>
void tiled_chunk_sums(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, bool first, acc_t* K, acc_t* s,
                      acc_t* q) {
  auto sums = [&] {
    std::fill(s, s + C, acc_t(0));
    std::fill(q, q + C, acc_t(0));
    row_tiles<acc_t, kRowTile>(r0, r1, C, {{reinterpret_cast<const char*>(x), int64_t(sizeof(scalar_t))}},
                               [&](int64_t r, int64_t n, int64_t c, auto NV) {
      shifted_sums_tile<decltype(NV)::value>(x + r * C + c, C, n, K + c, s + c, q + c);
    });
  };
  if (first) {                                                 // m̃ by a pass of its own
    std::fill(K, K + C, acc_t(0));
    sums();
    const acc_t inv = acc_t(1) / acc_t(r1 - r0);
    for (int64_t c = 0; c < C; ++c) K[c] = s[c] * inv;
  }
  sums();
}

// stats_rows_wide's algorithm (first chunk two-pass, later chunks shifted by the running mean, Chan's
// merge) on chunks of kChunkRows rows: each float accumulator sums ≤ 64 terms
template <typename scalar_t>
void stats_rows_tiled(const scalar_t* x, const Layout& l, double* mean_out, double* m2_out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t C = l.C, M = l.M, R = kChunkRows;
  // this thread's accumulators (the workers' lambda below names them without a capture: each its own)
  thread_local avec<acc_t> K, s, q;
  if (M <= R) {                   // one chunk (a virtual batch): no per-thread accumulators to clear and merge
    K.resize(C), s.resize(C), q.resize(C);
    tiled_chunk_sums<acc_t>(x, C, 0, M, true, K.data(), s.data(), q.data());
    return chunk_moments(K.data(), s.data(), q.data(), C, double(M), mean_out, m2_out);
  }
  const int nt = at::get_num_threads();
  std::vector<Moments>& per = moments_scratch(nt, C);
  at::parallel_for(0, (M + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
    Moments& acc = per[at::get_thread_num()];
    K.resize(C), s.resize(C), q.resize(C);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * R, r1 = std::min(M, r0 + R);
      tiled_chunk_sums<acc_t>(x, C, r0, r1, acc.n[0] == 0, K.data(), s.data(), q.data());
      merge_chunk(acc, K.data(), s.data(), q.data(), C, double(r1 - r0));
    }
  });
  merge_threads(per, C, mean_out, m2_out);
}

template <typename scalar_t>
void stats_rows(const scalar_t* x, const Layout& l, double* mean_out, double* m2_out) {
  if (rows_tiled<typename Acc<scalar_t>::type>(l.C)) stats_rows_tiled(x, l, mean_out, m2_out);
  else stats_rows_wide(x, l, mean_out, m2_out);
}

// Tasks over (n, channel range) in memory order, so every thread reads contiguous memory; each
// (n, c) plane of L values is reduced in blocks of at most kPlaneBlock values, each block by the
// corrected two-pass algorithm in cache (in float for float/bfloat16), and every block merged into
// the thread's per-channel double accumulators with Chan's update. The block bounds the float
// sums' length: without it their rounding error grew with the plane (relative variance error
// 4e-4 at 4096², 3e-3 at 8192², 8.5% for 2³⁰ bfloat16 values); with it the error stays that of
// 4096 terms, whatever the plane, and the second pass reads the block from L1/L2.
constexpr int64_t kPlaneBlock = 4096;

inline int64_t channel_splits(int64_t N, int64_t C) {
  const int64_t nt = at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(C, (2 * nt + N - 1) / N));
}

template <typename scalar_t>
void stats_ncl(const scalar_t* x, const Layout& l, double* mean_out, double* m2_out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = l.N, C = l.C, L = l.L;
  const int nt = at::get_num_threads();
  const int64_t cb = channel_splits(N, C);
  std::vector<Moments>& per = moments_scratch(nt, C);
  at::parallel_for(0, N * cb, 1, [&](int64_t t0, int64_t t1) {
    Moments& acc = per[at::get_thread_num()];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / cb, part = t % cb;
      const int64_t c0 = C * part / cb, c1 = C * (part + 1) / cb;
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t* plane = x + (i * C + c) * L;
        for (int64_t k0 = 0; k0 < L; k0 += kPlaneBlock) {
          const scalar_t* block = plane + k0;
          const int64_t n = std::min(kPlaneBlock, L - k0);
          acc_t sum = 0;
          for (int64_t k = 0; k < n; ++k) sum += acc_t(block[k]);
          const acc_t bm = sum / acc_t(n);
          acc_t dev = 0, dsum = 0;
          for (int64_t k = 0; k < n; ++k) {
            const acc_t d = acc_t(block[k]) - bm;
            dsum += d;
            dev += d * d;
          }
          const double ds = double(dsum);                                  // corrected two-pass
          chan(acc.n[c], acc.mean[c], acc.m2[c], double(n), double(bm) + ds / double(n),
               double(dev) - ds * ds / double(n));
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, mean = 0, m2 = 0;
    for (auto& p : per) chan(n, mean, m2, p.n[c], p.mean[c], p.m2[c]);
    mean_out[c] = mean;
    m2_out[c] = m2;
  }
}

// Σx/m of channel c in double, by a plain sum: the mean of a channel holding ±Inf, where the
// shifted and merged forms give NaN (Inf − Inf) but torch.nn's mean is ±Inf (or NaN for both).
// σ² = M2/m and s = 1/√(σ² + ε) per channel (var may be m2), in a branch-free loop that vectorizes
// (a scalar divide and root per channel showed in profiles of Ghost BN's small virtual batches)
inline void variance_invstd(const double* m2, double m, double eps, double* var, double* __restrict invstd,
                            int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const double v = m2[c] / m;
    var[c] = v;
    invstd[c] = 1.0 / std::sqrt(v + eps);
  }
}

template <typename scalar_t>
double plain_mean(const scalar_t* x, const Layout& l, int64_t c) {
  double sum = 0;
  if (l.rows) {
    for (int64_t r = 0; r < l.M; ++r) sum += double(x[r * l.C + c]);
  } else {
    for (int64_t i = 0; i < l.N; ++i)
      for (int64_t k = 0; k < l.L; ++k) sum += double(x[(i * l.C + c) * l.L + k]);
  }
  return sum / double(l.M);
}

// A channel holding ±Inf has a NaN or infinite mean from the shifted sums: its mean becomes the plain
// sum's (±Inf, or NaN for +Inf and −Inf together), as torch.nn's. The all-finite case is one
// vectorized test on the bits (an all-ones exponent: ±Inf or NaN), which the fast-math flags
// cannot fold away as they may m − m.
template <typename scalar_t>
inline void infinite_means(double* mean, const scalar_t* x, const Layout& l) {
  bool any = false;
  for (int64_t c = 0; c < l.C; ++c) {
    uint64_t u;
    std::memcpy(&u, mean + c, sizeof u);
    any |= ((u >> 52) & 0x7ff) == 0x7ff;
  }
  if (!any) return;
  for (int64_t c = 0; c < l.C; ++c)
    if (!std::isfinite(mean[c])) mean[c] = plain_mean<scalar_t>(x, l, c);
}

// ---------------------------------------------------------------------------------------------
// Elementwise: y = act(x·alpha + beta)
// ---------------------------------------------------------------------------------------------

// The rows layout's elementwise passes: body(first_row, width) over the wide rows (k rows at a
// time, width W, per-channel coefficients tiled k times) in parallel, then over the < k rows left
// (width C); done() closes each thread's share (a store fence after streaming stores).
template <typename F, typename G>
void parallel_wide_rows(const Layout& l, const Wide& w, F&& body, G&& done) {
  const int64_t units = l.M / w.k;
  at::parallel_for(0, units, std::max<int64_t>(1, 16384 / w.W), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) body(u * w.k, w.W);
    done();
  });
  for (int64_t r = units * w.k; r < l.M; ++r) body(r, l.C);
  done();
}

template <typename F>
void parallel_wide_rows(const Layout& l, const Wide& w, F&& body) {
  parallel_wide_rows(l, w, body, [] {});
}

// v (length C) tiled k times
template <typename T>
avec<T> tiled(const std::vector<T>& v, int64_t k) {
  avec<T> t(v.size() * k);
  std::copy(v.begin(), v.end(), t.begin());
  tile(t.data(), int64_t(v.size()), k);
  return t;
}

template <typename acc_t, int ACT>
inline acc_t activate(acc_t z, acc_t slope) {
  if (ACT == kRelu) return z <= acc_t(0) ? acc_t(0) : z;           // NaN stays NaN, as torch's relu
  if (ACT == kLeakyRelu) return z * (z >= acc_t(0) ? acc_t(1) : slope);
  return z;
}

// Non-temporal stores for large float32 outputs. A normal store first reads the line it writes
// (read-for-ownership): writing y costs two passes of memory traffic, not one, and the written
// lines evict what is still to be read. The test is the bytes that should stay cached across the
// pass — training normalize: x (saved for the backward) and y (2S); dx: dy, x and dx (3S);
// inference normalize: y only, x being dead after it (S) — against the last-level cache (at
// least 8 MiB; env BNLAB_STREAM_MB, set_stream_threshold): when they cannot all stay, the output
// is written with streaming stores that skip the read. Below it, normal stores leave the output
// cached for the next layer. Measured (bench --malloc keep, 2 threads, fwd+bwd/torch, two runs
// each): (4096,1024) 0.83-0.85 with this rule vs 0.95-0.97 when only outputs ≥ L3 were
// streamed; (64,64,28,28) channels_last 0.88-0.94 vs 1.02-1.03; streaming inference outputs of
// 2S ≥ L3 as well made eval of (4096,1024) 1.3× slower, hence S there.
// Each run: scalar head up to the vector's alignment, vector body, scalar tail. With AVX-512 one
// streaming store writes a whole 64-byte line; two 32-byte halves (AVX2) measured 10-18% slower
// on 64 MB outputs here (normalize and dx passes, `bnlab bench passes`).
int64_t stream_threshold_bytes = []() -> int64_t {
  const char* env = std::getenv("BNLAB_STREAM_MB");
  if (env) return int64_t(std::atoll(env)) << 20;
  // the L3 this CPU sees (sysfs; sysconf's figure can be the whole package's under a VM)
  int64_t l3 = 32LL << 20;
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
    long long v = 0;
    char unit = 0;
    if (std::fscanf(f, "%lld%c", &v, &unit) >= 1 && v > 0)
      l3 = int64_t(v) << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0);
    std::fclose(f);
  }
  return std::max<int64_t>(8LL << 20, l3);
}();

inline bool use_stream(int64_t touched_bytes) {
#ifdef BNLAB_STREAM
  return stream_threshold_bytes >= 0 && touched_bytes >= stream_threshold_bytes;
#else
  return false;
#endif
}

#ifdef BNLAB_STREAM
// The widest float vector the build has, as the streaming loops need it: with AVX-512 one store
// is one whole 64-byte line; AVX2 is the fallback.
struct StreamVec {
#if defined(__AVX512F__)
  using V = __m512;
  static constexpr int64_t kWidth = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static V relu(V z) { return _mm512_max_ps(_mm512_setzero_ps(), z); }   // max(0, NaN) = NaN: 2nd operand
  static V leaky(V z, V slope) {                                   // z·slope where z < 0
    return _mm512_mask_mul_ps(z, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), z, slope);
  }
#else
  using V = __m256;
  static constexpr int64_t kWidth = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
  static V relu(V z) { return _mm256_max_ps(_mm256_setzero_ps(), z); }
  static V leaky(V z, V slope) {
    return _mm256_blendv_ps(z, _mm256_mul_ps(z, slope), _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ));
  }
#endif
  static bool aligned(const float* p) { return (reinterpret_cast<uintptr_t>(p) & (kWidth * 4 - 1)) == 0; }
};

template <int ACT>
inline StreamVec::V activate_vec(StreamVec::V z, StreamVec::V slope) {
  if (ACT == kRelu) return StreamVec::relu(z);
  if (ACT == kLeakyRelu) return StreamVec::leaky(z, slope);
  return z;
}

// y[k] = act(x[k]·a[k] + b[k]) (PER_ELEM) or act(x[k]·a[0] + b[0]), k < n, streamed.
template <int ACT, bool PER_ELEM>
inline void affine_run_stream(const float* x, float* y, int64_t n, const float* a, const float* b, float slope) {
  using SV = StreamVec;
  auto one = [&](int64_t i) { y[i] = activate<float, ACT>(x[i] * a[PER_ELEM ? i : 0] + b[PER_ELEM ? i : 0], slope); };
  int64_t k = 0;
  for (; k < n && !SV::aligned(y + k); ++k) one(k);
  const SV::V va = SV::set1(a[0]), vb = SV::set1(b[0]), vs = SV::set1(slope);
  for (; k + SV::kWidth <= n; k += SV::kWidth) {
    const SV::V av = PER_ELEM ? SV::load(a + k) : va;
    const SV::V bv = PER_ELEM ? SV::load(b + k) : vb;
    SV::stream(y + k, activate_vec<ACT>(SV::fmadd(SV::load(x + k), av, bv), vs));
  }
  for (; k < n; ++k) one(k);
}

// o[k] = g[k]·k1 + x[k]·k2 + k3, coefficients per element (PER_ELEM) or scalar, streamed.
template <bool PER_ELEM>
inline void dx_run_stream(const float* g, const float* x, float* o, int64_t n, const float* k1, const float* k2,
                          const float* k3) {
  using SV = StreamVec;
  auto one = [&](int64_t i) {
    const int64_t j = PER_ELEM ? i : 0;
    o[i] = g[i] * k1[j] + x[i] * k2[j] + k3[j];
  };
  int64_t k = 0;
  for (; k < n && !SV::aligned(o + k); ++k) one(k);
  const SV::V a = SV::set1(k1[0]), b = SV::set1(k2[0]), c = SV::set1(k3[0]);
  for (; k + SV::kWidth <= n; k += SV::kWidth) {
    const SV::V av = PER_ELEM ? SV::load(k1 + k) : a;
    const SV::V bv = PER_ELEM ? SV::load(k2 + k) : b;
    const SV::V cv = PER_ELEM ? SV::load(k3 + k) : c;
    SV::stream(o + k, SV::fmadd(SV::load(g + k), av, SV::fmadd(SV::load(x + k), bv, cv)));
  }
  for (; k < n; ++k) one(k);
}

template <int ACT>
void affine_stream(const float* x, float* y, const Layout& l, const std::vector<float>& alpha,
                   const std::vector<float>& beta, float slope) {
  if (l.rows) {
    const int64_t C = l.C;
    const Wide w = wide_rows(C);
    const avec<float> a = tiled(alpha, w.k), b = tiled(beta, w.k);
    parallel_wide_rows(l, w, [&](int64_t r, int64_t n) {
      affine_run_stream<ACT, true>(x + r * C, y + r * C, n, a.data(), b.data(), slope);
    }, [] { _mm_sfence(); });
  } else {
    const int64_t C = l.C, L = l.L;
    at::parallel_for(0, l.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        affine_run_stream<ACT, false>(x + b * L, y + b * L, L, &alpha[b % C], &beta[b % C], slope);
      _mm_sfence();
    });
  }
}

void dx_stream(const float* dy, const float* x, float* dx, const Layout& l, const std::vector<float>& k1,
               const std::vector<float>& k2, const std::vector<float>& k3) {
  if (l.rows) {
    const int64_t C = l.C;
    const Wide w = wide_rows(C);
    const avec<float> a = tiled(k1, w.k), b = tiled(k2, w.k), c = tiled(k3, w.k);
    parallel_wide_rows(l, w, [&](int64_t r, int64_t n) {
      dx_run_stream<true>(dy + r * C, x + r * C, dx + r * C, n, a.data(), b.data(), c.data());
    }, [] { _mm_sfence(); });
  } else {
    const int64_t C = l.C, L = l.L;
    at::parallel_for(0, l.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b % C;
        dx_run_stream<false>(dy + b * L, x + b * L, dx + b * L, L, &k1[c], &k2[c], &k3[c]);
      }
      _mm_sfence();
    });
  }
}
#endif

template <typename scalar_t, int ACT>
void affine_act(const scalar_t* x, scalar_t* y, const Layout& l, const std::vector<typename Acc<scalar_t>::type>& alpha,
                const std::vector<typename Acc<scalar_t>::type>& beta, double slope,
                bool training) {
  using acc_t = typename Acc<scalar_t>::type;
  const acc_t sl = acc_t(slope);
#ifdef BNLAB_STREAM
  if constexpr (std::is_same<scalar_t, float>::value) {
    // training: x stays saved for the backward, so the pass touches x and y (2S); inference: x is
    // dead after this pass and y is what the next layer reads (S)
    const int64_t S = l.N * l.C * l.L * int64_t(sizeof(float));
    if (use_stream(training ? 2 * S : S)) return affine_stream<ACT>(x, y, l, alpha, beta, sl);
  }
#endif
  if (l.rows) {
    const int64_t C = l.C;
    const Wide w = wide_rows(C);
    const avec<acc_t> a = tiled(alpha, w.k), b = tiled(beta, w.k);
    parallel_wide_rows(l, w, [&](int64_t r, int64_t n) {
      const scalar_t* __restrict xr = x + r * C;
      scalar_t* __restrict yr = y + r * C;
      for (int64_t c = 0; c < n; ++c) yr[c] = scalar_t(activate<acc_t, ACT>(acc_t(xr[c]) * a[c] + b[c], sl));
    });
  } else {
    const int64_t C = l.C, L = l.L;
    at::parallel_for(0, l.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b % C;
        const acc_t a = alpha[c], be = beta[c];
        const scalar_t* xb = x + b * L;
        scalar_t* yb = y + b * L;
        for (int64_t k = 0; k < L; ++k) yb[k] = scalar_t(activate<acc_t, ACT>(acc_t(xb[k]) * a + be, sl));
      }
    });
  }
}

template <typename scalar_t>
void affine(const scalar_t* x, scalar_t* y, const Layout& l, const std::vector<typename Acc<scalar_t>::type>& alpha,
            const std::vector<typename Acc<scalar_t>::type>& beta, int act, double slope,
            bool training) {
  if (act == kRelu) affine_act<scalar_t, kRelu>(x, y, l, alpha, beta, slope, training);
  else if (act == kLeakyRelu) affine_act<scalar_t, kLeakyRelu>(x, y, l, alpha, beta, slope, training);
  else affine_act<scalar_t, kIdentity>(x, y, l, alpha, beta, slope, training);
}

// A per-channel tensor's values as doubles, read where they lie (any floating dtype and stride):
// no tensor is allocated — a .to(kDouble) per argument cost a few µs a call, five times a step.
// Per-channel tensors may have any shape with C values (torch.nn accepts a (1, C) weight): 1-D of
// any stride, or contiguous.
inline int64_t channel_stride(const at::Tensor& t) {
  return t.dim() == 0 ? 1 : (t.dim() == 1 ? t.stride(0) : 1);
}

inline bool channel_layout_ok(const at::Tensor& t, int64_t C) {
  return t.numel() == C && t.device().is_cpu() && (t.dim() <= 1 || t.is_contiguous());
}

// Running statistics must be 1-D (as torch.nn requires), of any stride.
inline bool running_layout_ok(const at::Tensor& t, int64_t C) {
  return t.numel() == C && t.device().is_cpu() && t.dim() == 1;
}

std::vector<double> to_vec(const at::Tensor& t, int64_t C) {
  const int64_t n = t.numel(), stride = channel_stride(t);
  TORCH_CHECK(channel_layout_ok(t, C), "per-channel tensors must hold ", C,
              " values on the CPU (1-D, or contiguous), got shape ", t.sizes(), " on ", t.device());
  std::vector<double> v(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "bnlab_to_vec", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) v[i] = double(p[i * stride]);
  });
  return v;
}

template <typename acc_t>
void coefficients(const double* mean, const double* invstd, const at::Tensor& weight, const at::Tensor& bias,
                  int64_t C, std::vector<acc_t>& alpha, std::vector<acc_t>& beta) {
  alpha.resize(C);
  beta.resize(C);
  const std::vector<double> w = weight.defined() ? to_vec(weight, C) : std::vector<double>();
  const std::vector<double> bb = bias.defined() ? to_vec(bias, C) : std::vector<double>();
  const double* wp = weight.defined() ? w.data() : nullptr;
  const double* bp = bias.defined() ? bb.data() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    const double a = invstd[c] * (wp ? wp[c] : 1.0);
    alpha[c] = acc_t(a);
    beta[c] = acc_t((bp ? bp[c] : 0.0) - mean[c] * a);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward reductions: Σdz and Σdz·(x − μ), where dz = dy (plain BN) or, from the output of a
// fused activation, dz = dy·act'(z) with z recovered from y (see bn_act_backward).
// ---------------------------------------------------------------------------------------------

// Sum the per-thread partial sums (in thread order: deterministic for a given thread count).
inline void reduce_threads(const std::vector<std::vector<double>>& s1, const std::vector<std::vector<double>>& s2,
                           int64_t C, double* sum_dy, double* sum_dy_xmu) {
  // threads outer, channels inner (contiguous, vectorized); the same order of additions per channel
  std::fill(sum_dy, sum_dy + C, 0.0);
  std::fill(sum_dy_xmu, sum_dy_xmu + C, 0.0);
  for (size_t t = 0; t < s1.size(); ++t) {
    const double* __restrict a = s1[t].data();
    const double* __restrict b = s2[t].data();
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += a[c];
      sum_dy_xmu[c] += b[c];
    }
  }
}

// One chunk's float sums as the double results (what reduce_threads gives for a single chunk)
template <typename acc_t>
inline void widen_sums(const acc_t* a1, const acc_t* a2, int64_t C, double* sum_dy, double* sum_dy_xmu) {
  for (int64_t c = 0; c < C; ++c) {
    sum_dy[c] = double(a1[c]);
    sum_dy_xmu[c] = double(a2[c]);
  }
}

// Rows layout: rows in memory order, four at a time; a chunk's sums in float (L1-resident arrays),
// added into the thread's double sums once per chunk.
template <typename acc_t, typename scalar_t>
inline void grad_sums_chunk(const scalar_t* __restrict dy, const scalar_t* __restrict x, int64_t W, int64_t r0,
                            int64_t r1, const acc_t* __restrict mu, acc_t* __restrict a1, acc_t* __restrict a2) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const scalar_t* __restrict g = dy + r * W;
    const scalar_t* __restrict xr = x + r * W;
    for (int64_t c = 0; c < W; ++c) {
      const acc_t m = mu[c];
      const acc_t g0 = acc_t(g[c]), g1 = acc_t(g[W + c]), g2 = acc_t(g[2 * W + c]), g3 = acc_t(g[3 * W + c]);
      a1[c] += (g0 + g1) + (g2 + g3);
      a2[c] += (g0 * (acc_t(xr[c]) - m) + g1 * (acc_t(xr[W + c]) - m)) +
               (g2 * (acc_t(xr[2 * W + c]) - m) + g3 * (acc_t(xr[3 * W + c]) - m));
    }
  }
  for (; r < r1; ++r)
    for (int64_t c = 0; c < W; ++c) {
      const acc_t gv = acc_t(dy[r * W + c]);
      a1[c] += gv;
      a2[c] += gv * (acc_t(x[r * W + c]) - mu[c]);
    }
}

template <typename scalar_t>
void grad_sums_rows_wide(const scalar_t* dy, const scalar_t* x, const double* mean, const Layout& l,
                         double* sum_dy, double* sum_dy_xmu) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t C = l.C, M = l.M;
  const Wide w = wide_rows(C);
  thread_local avec<acc_t> mu_scratch;          // the caller's: a lambda does not capture a thread_local
  avec<acc_t>& mu = mu_scratch;
  mu.resize(w.W);
  for (int64_t c = 0; c < C; ++c) mu[c] = acc_t(mean[c]);
  tile(mu.data(), C, w.k);
  const int64_t R = w.R;
  // f1, f2 ← the float sums of rows [r0, r1), folded to C
  auto chunk = [&](int64_t r0, int64_t r1, acc_t* f1, acc_t* f2) {
    std::fill(f1, f1 + w.W, acc_t(0));
    std::fill(f2, f2 + w.W, acc_t(0));
    wide_chunk(w, C, r0, r1, [&](int64_t r, int64_t n, int64_t width) {
      grad_sums_chunk<acc_t, scalar_t>(dy + r * C, x + r * C, width, 0, n, mu.data(), f1, f2);
    });
    fold(f1, C, w.k);
    fold(f2, C, w.k);
  };
  // this thread's float sums (the workers' lambda below names them without a capture: each its own)
  thread_local avec<acc_t> a1, a2;
  if (M <= R) {                   // one chunk (a virtual batch): no per-thread sums to clear and reduce
    a1.resize(w.W), a2.resize(w.W);
    chunk(0, M, a1.data(), a2.data());
    return widen_sums(a1.data(), a2.data(), C, sum_dy, sum_dy_xmu);
  }
  const int nt = at::get_num_threads();
  std::vector<std::vector<double>>& s1 = sums_scratch(0, nt, C);
  std::vector<std::vector<double>>& s2 = sums_scratch(1, nt, C);
  at::parallel_for(0, (M + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    double* __restrict t1 = s1[tid].data();
    double* __restrict t2 = s2[tid].data();
    a1.resize(w.W), a2.resize(w.W);
    for (int64_t b = b0; b < b1; ++b) {
      chunk(b * R, std::min(M, (b + 1) * R), a1.data(), a2.data());
      for (int64_t c = 0; c < C; ++c) {
        t1[c] += double(a1[c]);
        t2[c] += double(a2[c]);
      }
    }
  });
  reduce_threads(s1, s2, C, sum_dy, sum_dy_xmu);
}

// a1[c] += Σ_r dy[r][c], a2[c] += Σ_r dy[r][c]·(x[r][c] − μ[c]) over n rows, NV vectors of channels
template <int NV, typename scalar_t, typename acc_t>
inline void grad_sums_tile(const scalar_t* __restrict dy, const scalar_t* __restrict x, int64_t C, int64_t n,
                           const acc_t* __restrict mu, acc_t* __restrict a1, acc_t* __restrict a2) {
  using vec = typename V64<acc_t>::v;
  constexpr int L = V64<acc_t>::n;
  vec m[NV], a[NV] = {}, b[NV] = {};
  load_tile(m, mu);
  for (int64_t r = 0; r < n; ++r) {
    for (int v = 0; v < NV; ++v) {
      const vec g = VLoad<scalar_t>::load(dy + r * C + v * L);
      a[v] += g;
      b[v] += g * (VLoad<scalar_t>::load(x + r * C + v * L) - m[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    *reinterpret_cast<vec*>(a1 + v * L) += a[v];
    *reinterpret_cast<vec*>(a2 + v * L) += b[v];
  }
}

// The rows layout with C a multiple of the vector width (see stats_rows_tiled): chunks of
// kChunkRows rows summed in registers in float, added into the thread's double sums per chunk.
template <typename scalar_t>
void grad_sums_rows_tiled(const scalar_t* dy, const scalar_t* x, const double* mean, const Layout& l,
                          double* sum_dy, double* sum_dy_xmu) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t C = l.C, M = l.M, R = kChunkRows;
  thread_local avec<acc_t> mu_scratch;          // the caller's: a lambda does not capture a thread_local
  avec<acc_t>& mu = mu_scratch;
  mu.resize(C);
  for (int64_t c = 0; c < C; ++c) mu[c] = acc_t(mean[c]);
  const int64_t sz = sizeof(scalar_t);
  // f1, f2 ← the float sums of rows [r0, r1)
  auto chunk = [&](int64_t r0, int64_t r1, acc_t* f1, acc_t* f2) {
    std::fill(f1, f1 + C, acc_t(0));
    std::fill(f2, f2 + C, acc_t(0));
    row_tiles<acc_t, kRowTile>(r0, r1, C, {{reinterpret_cast<const char*>(dy), sz}, {reinterpret_cast<const char*>(x), sz}},
                               [&](int64_t r, int64_t n, int64_t c, auto NV) {
      grad_sums_tile<decltype(NV)::value>(dy + r * C + c, x + r * C + c, C, n, mu.data() + c, f1 + c, f2 + c);
    });
  };
  // this thread's float sums (the workers' lambda below names them without a capture: each its own)
  thread_local avec<acc_t> a1, a2;
  if (M <= R) {                   // one chunk (a virtual batch): no per-thread sums to clear and reduce
    a1.resize(C), a2.resize(C);
    chunk(0, M, a1.data(), a2.data());
    return widen_sums(a1.data(), a2.data(), C, sum_dy, sum_dy_xmu);
  }
  const int nt = at::get_num_threads();
  std::vector<std::vector<double>>& s1 = sums_scratch(0, nt, C);
  std::vector<std::vector<double>>& s2 = sums_scratch(1, nt, C);
  at::parallel_for(0, (M + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    double* __restrict t1 = s1[tid].data();
    double* __restrict t2 = s2[tid].data();
    a1.resize(C), a2.resize(C);
    for (int64_t b = b0; b < b1; ++b) {
      chunk(b * R, std::min(M, (b + 1) * R), a1.data(), a2.data());
      for (int64_t c = 0; c < C; ++c) {
        t1[c] += double(a1[c]);
        t2[c] += double(a2[c]);
      }
    }
  });
  reduce_threads(s1, s2, C, sum_dy, sum_dy_xmu);
}

template <typename scalar_t>
void grad_sums_rows(const scalar_t* dy, const scalar_t* x, const double* mean, const Layout& l, double* sum_dy,
                    double* sum_dy_xmu) {
  if (rows_tiled<typename Acc<scalar_t>::type>(l.C)) grad_sums_rows_tiled(dy, x, mean, l, sum_dy, sum_dy_xmu);
  else grad_sums_rows_wide(dy, x, mean, l, sum_dy, sum_dy_xmu);
}

template <typename scalar_t>
void grad_sums_ncl(const scalar_t* dy, const scalar_t* x, const double* mean, const Layout& l,
                   double* sum_dy, double* sum_dy_xmu) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = l.N, C = l.C, L = l.L;
  const int nt = at::get_num_threads();
  const int64_t cb = channel_splits(N, C);
  std::vector<std::vector<double>>& s1 = sums_scratch(0, nt, C);
  std::vector<std::vector<double>>& s2 = sums_scratch(1, nt, C);
  at::parallel_for(0, N * cb, 1, [&](int64_t t0, int64_t t1) {
    const int tid = at::get_thread_num();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / cb, part = t % cb;
      const int64_t c0 = C * part / cb, c1 = C * (part + 1) / cb;
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t mu = acc_t(mean[c]);
        const scalar_t* g = dy + (i * C + c) * L;
        const scalar_t* xb = x + (i * C + c) * L;
        for (int64_t k0 = 0; k0 < L; k0 += kPlaneBlock) {         // float sums of ≤ kPlaneBlock terms
          const int64_t k1 = std::min(L, k0 + kPlaneBlock);
          acc_t a1 = 0, a2 = 0;
          for (int64_t k = k0; k < k1; ++k) {
            const acc_t gv = acc_t(g[k]);
            a1 += gv;
            a2 += gv * (acc_t(xb[k]) - mu);
          }
          s1[tid][c] += a1;
          s2[tid][c] += a2;
        }
      }
    }
  });
  reduce_threads(s1, s2, C, sum_dy, sum_dy_xmu);
}

// dx = dy·k1 + x·k2 + k3 per channel, written over dy (g ← g·k1 + x·k2 + k3): used when dy is dead
// after the backward (see TrainBN::backward). Each value is read before it is overwritten, the lines
// are already in cache from the read, so neither a read-for-ownership nor a streaming store is
// needed, and dx stays cached for the layer below. No __restrict on g: it is read and written.
// (dx_pass's plain loops are the same arithmetic, kept apart on purpose: they need __restrict
// between dy and dx to vectorize without runtime overlap checks, which equal pointers would fail.)
template <typename scalar_t>
void dx_pass_inplace(scalar_t* dy, const scalar_t* x, const Layout& l,
                     const std::vector<typename Acc<scalar_t>::type>& k1,
                     const std::vector<typename Acc<scalar_t>::type>& k2,
                     const std::vector<typename Acc<scalar_t>::type>& k3) {
  using acc_t = typename Acc<scalar_t>::type;
  if (l.rows) {
    const int64_t C = l.C;
    const Wide w = wide_rows(C);
    const avec<acc_t> a = tiled(k1, w.k), b = tiled(k2, w.k), c3 = tiled(k3, w.k);
    parallel_wide_rows(l, w, [&](int64_t r, int64_t n) {
      scalar_t* g = dy + r * C;
      const scalar_t* __restrict xr = x + r * C;
      for (int64_t c = 0; c < n; ++c) g[c] = scalar_t(acc_t(g[c]) * a[c] + acc_t(xr[c]) * b[c] + c3[c]);
    });
  } else {
    const int64_t C = l.C, L = l.L;
    at::parallel_for(0, l.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b % C;
        const acc_t a = k1[c], bb = k2[c], cc = k3[c];
        scalar_t* g = dy + b * L;
        const scalar_t* __restrict xb = x + b * L;
        for (int64_t k = 0; k < L; ++k) g[k] = scalar_t(acc_t(g[k]) * a + acc_t(xb[k]) * bb + cc);
      }
    });
  }
}

// dx = dy·k1 + x·k2 + k3 per channel
template <typename scalar_t>
void dx_pass(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Layout& l,
             const std::vector<typename Acc<scalar_t>::type>& k1, const std::vector<typename Acc<scalar_t>::type>& k2,
             const std::vector<typename Acc<scalar_t>::type>& k3) {
  using acc_t = typename Acc<scalar_t>::type;
#ifdef BNLAB_STREAM
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (use_stream(3 * l.N * l.C * l.L * int64_t(sizeof(float)))) return dx_stream(dy, x, dx, l, k1, k2, k3);
  }
#endif
  if (l.rows) {
    const int64_t C = l.C;
    const Wide w = wide_rows(C);
    const avec<acc_t> a = tiled(k1, w.k), b = tiled(k2, w.k), c3 = tiled(k3, w.k);
    parallel_wide_rows(l, w, [&](int64_t r, int64_t n) {
      const scalar_t* __restrict g = dy + r * C;
      const scalar_t* __restrict xr = x + r * C;
      scalar_t* __restrict o = dx + r * C;
      for (int64_t c = 0; c < n; ++c) o[c] = scalar_t(acc_t(g[c]) * a[c] + acc_t(xr[c]) * b[c] + c3[c]);
    });
  } else {
    const int64_t C = l.C, L = l.L;
    at::parallel_for(0, l.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c = b % C;
        const acc_t a = k1[c], bb = k2[c], cc = k3[c];
        const scalar_t* g = dy + b * L;
        const scalar_t* xb = x + b * L;
        scalar_t* o = dx + b * L;
        for (int64_t k = 0; k < L; ++k) o[k] = scalar_t(acc_t(g[k]) * a + acc_t(xb[k]) * bb + cc);
      }
    });
  }
}

at::Tensor vec(const std::vector<double>& v, at::ScalarType dtype) {
  at::Tensor out = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(dtype));
  if (dtype == at::kDouble) {
    std::copy(v.begin(), v.end(), out.data_ptr<double>());
  } else {
    float* p = out.data_ptr<float>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = float(v[i]);
  }
  return out;
}

// r ← (1 − m)·r + m·x_t in place, x_t the unbiased (count/(count − 1)) or biased batch variance.
void update_running(const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                    const std::vector<double>& mean, const std::vector<double>& var, double count, double momentum,
                    bool unbiased) {
  const double factor = (unbiased && count > 1) ? count / (count - 1) : 1.0;
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  // both checked before either changes: an error leaves the buffers as they were
  const int64_t C = int64_t(mean.size());
  TORCH_CHECK(!has_rm || running_layout_ok(*running_mean, C), "running_mean must be 1-D with ", C,
              " values on the CPU, got shape ", running_mean->sizes(), " on ", running_mean->device());
  TORCH_CHECK(!has_rv || running_layout_ok(*running_var, C), "running_var must be 1-D with ", C,
              " values on the CPU, got shape ", running_var->sizes(), " on ", running_var->device());
  // the buffers as they lie: any stride (a buffer loaded with load_state_dict(assign=True) may be
  // a view), any floating dtype
  if (has_rm) {
    at::Tensor rm = *running_mean;
    const int64_t st = channel_stride(rm);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rm.scalar_type(), "bnlab_running_mean", [&] {
      scalar_t* p = rm.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        scalar_t& r = p[c * st];
        r = scalar_t(double(r) + momentum * (mean[c] - double(r)));
      }
    });
  }
  if (has_rv) {
    at::Tensor rv = *running_var;
    const int64_t st = channel_stride(rv);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rv.scalar_type(), "bnlab_running_var", [&] {
      scalar_t* p = rv.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        scalar_t& r = p[c * st];
        const double v = var[c] * factor;
        r = scalar_t(double(r) + momentum * (v - double(r)));
      }
    });
  }
}

// dy in x's dtype and strides: itself when it already is, else a converted copy (empty_like keeps a
// dense x's strides exactly, whatever its memory format)
inline at::Tensor in_layout_of(const at::Tensor& dy, const at::Tensor& x) {
  return dy.scalar_type() == x.scalar_type() && dy.strides() == x.strides() ? dy : at::empty_like(x).copy_(dy);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

// Training forward: (y, mean, var_biased, invstd); y = act(γ·x̂ + β) (act = identity for BN).
std::vector<at::Tensor> forward_train(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                      const c10::optional<at::Tensor>& bias, double eps, int64_t act,
                                      double slope, const c10::optional<at::Tensor>& running_mean,
                                      const c10::optional<at::Tensor>& running_var, double momentum,
                                      bool unbiased) {
  const Layout l = layout_of(x);
  std::vector<double> mean(l.C), m2(l.C), var(l.C), invstd(l.C);
  at::Tensor y = empty_out(x, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_forward_train", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (l.rows) stats_rows<scalar_t>(xp, l, mean.data(), m2.data());
    else stats_ncl<scalar_t>(xp, l, mean.data(), m2.data());
    infinite_means<scalar_t>(mean.data(), xp, l);
    variance_invstd(m2.data(), double(l.M), eps, var.data(), invstd.data(), l.C);
    using acc_t = typename Acc<scalar_t>::type;
    std::vector<acc_t> alpha, beta;
    coefficients<acc_t>(mean.data(), invstd.data(), weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                        l.C, alpha, beta);
    affine<scalar_t>(xp, y.data_ptr<scalar_t>(), l, alpha, beta, int(act), slope, /*training=*/true);
  });
  update_running(running_mean, running_var, mean, var, double(l.M), momentum, unbiased);
  const auto acc = acc_type(x.scalar_type());
  return {y, vec(mean, acc), vec(var, acc), vec(invstd, acc)};
}

// Eval forward with given statistics: y = act(x·α + b).
at::Tensor forward_eval(const at::Tensor& x, const at::Tensor& running_mean, const at::Tensor& running_var,
                        const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
                        int64_t act, double slope) {
  const Layout l = layout_of(x);
  const std::vector<double> mean = to_vec(running_mean, l.C), rv = to_vec(running_var, l.C);
  std::vector<double> invstd(l.C);
  const double* rvp = rv.data();
  for (int64_t c = 0; c < l.C; ++c) invstd[c] = 1.0 / std::sqrt(rvp[c] + eps);
  at::Tensor y = empty_out(x, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_forward_eval", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    std::vector<acc_t> alpha, beta;
    coefficients<acc_t>(mean.data(), invstd.data(), weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                        l.C, alpha, beta);
    affine<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), l, alpha, beta, int(act), slope,
                     /*training=*/false);
  });
  return y;
}

// Inference of the variants whose transform is BN's with another divisor, in one call (no small
// tensor operation before the pass): y = (x − μ)/s·γ + β per channel, μ = mean or 0 (None), and
// s = scale_g + add (ℓp: the running ℓp scale of the channel's group, G values), √(scale_c + add)
// (sqrt_scale: DetachedNorm's running variance), or 1 (no scale).
at::Tensor scaled_eval(const at::Tensor& x, const c10::optional<at::Tensor>& mean_t,
                       const c10::optional<at::Tensor>& scale_t, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, double add, bool sqrt_scale) {
  const Layout l = layout_of(x);
  const int64_t C = l.C;
  const bool has_mean = mean_t.has_value() && mean_t->defined(), has_scale = scale_t.has_value() && scale_t->defined();
  const std::vector<double> mean = has_mean ? to_vec(*mean_t, C) : std::vector<double>(C, 0.0);
  std::vector<double> invstd(C, 1.0);
  if (has_scale) {
    const int64_t G = scale_t->numel();
    TORCH_CHECK(G >= 1 && C % G == 0, "scaled_eval: the scale's ", G, " values must split the ", C, " channels");
    const std::vector<double> sc = to_vec(*scale_t, G);
    for (int64_t c = 0; c < C; ++c) {
      const double v = sc[c / (C / G)] + add;
      invstd[c] = 1.0 / (sqrt_scale ? std::sqrt(v) : v);
    }
  }
  at::Tensor y = empty_out(x, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_scaled_eval", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    std::vector<acc_t> alpha, beta;
    coefficients<acc_t>(mean.data(), invstd.data(), weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), C,
                        alpha, beta);
    affine<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), l, alpha, beta, kIdentity, 0.0,
                     /*training=*/false);
  });
  return y;
}

// Training backward of BN: (dx, dgamma, dbeta) from dy, x and the forward's mean and invstd.
//   dx = γ·invstd·(dy − Σdy/m − x̂·Σ(dy·x̂)/m) = dy·k1 + x·k2 + k3
// dx is written over dy and returned in its place (*wrote_over_dy set) when dy is dead — the caller
// holds its only reference (dy_dead_for below) — or when dy had to be converted to x's dtype or
// layout: the converted copy is this call's own.
// may_overwrite = false never writes over dy (set_dx_over_dy(False): the ablation).
std::vector<at::Tensor> backward_train_impl(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& mean_t,
                                            const at::Tensor& invstd_t, const c10::optional<at::Tensor>& weight,
                                            bool dy_dead, bool* wrote_over_dy = nullptr, bool may_overwrite = true) {
  const Layout l = layout_of(x);
  const at::Tensor dy = in_layout_of(dy_in, x);
  const std::vector<double> md = to_vec(mean_t, l.C), id = to_vec(invstd_t, l.C);
  const double* mean = md.data();
  const double* invstd = id.data();
  std::vector<double> s1(l.C), s2(l.C);
  const bool own_copy = !dy.is_alias_of(dy_in) && dy.strides() == x.strides();
  const bool inplace = may_overwrite && ((dy_dead && dy.is_same(dy_in)) || own_copy);
  if (wrote_over_dy) *wrote_over_dy = inplace;
  at::Tensor dx = inplace ? dy : empty_out(x, x.scalar_type());
  const bool has_w = weight.has_value() && weight->defined();
  const std::vector<double> w = has_w ? to_vec(*weight, l.C) : std::vector<double>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_backward_train", [&] {
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (l.rows) grad_sums_rows<scalar_t>(dyp, xp, mean, l, s1.data(), s2.data());
    else grad_sums_ncl<scalar_t>(dyp, xp, mean, l, s1.data(), s2.data());
    using acc_t = typename Acc<scalar_t>::type;
    std::vector<acc_t> k1(l.C), k2(l.C), k3(l.C);
    const double m = double(l.M);
    const double* wp = has_w ? w.data() : nullptr;
    for (int64_t c = 0; c < l.C; ++c) {
      const double scale = invstd[c] * (wp ? wp[c] : 1.0);                  // γ·invstd
      const double kk = invstd[c] * invstd[c] * s2[c] / m;                 // mean(dy·x̂)·invstd
      k1[c] = acc_t(scale);
      k2[c] = acc_t(-scale * kk);
      k3[c] = acc_t(-scale * s1[c] / m + scale * kk * mean[c]);
    }
    if (inplace) dx_pass_inplace<scalar_t>(dx.data_ptr<scalar_t>(), xp, l, k1, k2, k3);
    else dx_pass<scalar_t>(dyp, xp, dx.data_ptr<scalar_t>(), l, k1, k2, k3);
  });
  std::vector<double> dgamma(l.C);
  for (int64_t c = 0; c < l.C; ++c) dgamma[c] = s2[c] * invstd[c];           // Σ dy·x̂
  const auto acc = acc_type(x.scalar_type());
  return {dx, vec(dgamma, acc), vec(s1, acc)};
}

std::vector<at::Tensor> backward_train(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                       const at::Tensor& invstd, const c10::optional<at::Tensor>& weight) {
  return backward_train_impl(dy, x, mean, invstd, weight, /*dy_dead=*/false);
}

// ---------------------------------------------------------------------------------------------
// Groups: BN's passes over consecutive slices of the batch, each with its own statistics
// ---------------------------------------------------------------------------------------------
// The variants that are BN with a twist (Ghost BN: one set of moments per virtual batch; Batch
// Renorm: BN's normalize with per-channel r, d folded into the affine; Detached: BN's forward with
// the statistics' backward terms dropped) run on these entries. A slice of the batch dimension is
// itself a contiguous tensor in both layouts (NCL and rows: dimension 0 is outermost in memory),
// so every group is the ordinary kernel on a sub-layout; `sizes` are the groups' sizes along
// dimension 0 (their sum is N). Per-group tensors are (G, C) in the accumulation dtype.

namespace {

struct Groups {
  std::vector<int64_t> start, size;
};

Groups groups_of(const Layout& l, const std::vector<int64_t>& sizes) {
  Groups g;
  int64_t at = 0;
  for (int64_t n : sizes) {
    TORCH_CHECK(n > 0, "bnlab kernel: group sizes must be positive");
    g.start.push_back(at);
    g.size.push_back(n);
    at += n;
  }
  TORCH_CHECK(at == l.N, "bnlab kernel: group sizes sum to ", at, ", the batch has ", l.N);
  return g;
}

inline Layout slice_layout(const Layout& l, int64_t n) {
  Layout s = l;
  s.N = n;
  s.M = n * l.L;
  return s;
}

// a (G, C) or (C) per-channel argument → G·C doubles (a (C) one repeated for every group); empty if absent
std::vector<double> per_group(const c10::optional<at::Tensor>& t, int64_t G, int64_t C) {
  if (!t.has_value() || !t->defined()) return {};
  at::Tensor v = t->detach().to(at::kDouble).contiguous().reshape({-1});
  TORCH_CHECK(v.numel() == C || v.numel() == G * C, "per-channel arguments need ", C, " or ", G * C,
              " values, got ", v.numel());
  std::vector<double> out(G * C);
  const double* p = v.data_ptr<double>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) out[g * C + c] = v.numel() == C ? p[c] : p[g * C + c];
  return out;
}

at::Tensor mat(const std::vector<double>& v, int64_t G, int64_t C, at::ScalarType dtype) {
  return vec(v, dtype).reshape({G, C});
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ℓp normalization (variants/lp.py): centered per channel with the batch mean μ, scaled per
// feature group g by D_g = mean_i n_ig + eps, where n_ig is sample i's width-normalized ℓp norm of
// its centered values in the group (p = 1: mean |z|; 2: (mean z²)^½; ∞: max |z|):
//     y = (x − μ)·γ/D + β
// Backward, with z = x − μ, a = γ/D, κ_g = −Σ_{c∈g} γ_c Σ(dy·z)_c / (N·D_g²) and φ = ∂n_ig/∂z
// (sign(z)/M_g, z/(M_g·n_ig), or sign(z)/ties at the maximum):
//     dz = dy·a + κ·φ,   dx = dz − mean_{n,l}(dz),   dγ = Σ dy·z / D,   dβ = Σ dy
// so the forward is BN's passes plus one read (the norms) and the backward is BN's two passes.
// p is 1, 2, or 0 for ∞.
// ---------------------------------------------------------------------------------------------

namespace {

// f(z) accumulated for the norm: |z|, z², or |z| (maximized)
template <int P, typename acc_t>
inline acc_t lp_term(acc_t z) {
  if constexpr (P == 2) return z * z;
  else return std::abs(z);
}

// Per-channel means as plain sums in double (per-thread partials added in thread order): exact
// where the data make them so (integer-valued inputs), so x − μ is exactly 0 wherever x equals
// the mean — there sign's subgradient is 0, as in the definition. ℓp needs no variance.
// 8 consecutive values as a vector of doubles
template <typename scalar_t> struct VLoadF64 {
  using vec = V64<double>::v;
  static vec load(const scalar_t* p) {
    if constexpr (std::is_same<scalar_t, double>::value) {
      return *reinterpret_cast<const vec*>(p);
    } else if constexpr (std::is_same<scalar_t, float>::value) {
      typedef float f8 __attribute__((vector_size(32), aligned(4), may_alias));
      return __builtin_convertvector(*reinterpret_cast<const f8*>(p), vec);
    } else {                                                    // bfloat16: a float's upper half
      typedef uint16_t h8 __attribute__((vector_size(16), aligned(2), may_alias));
      typedef uint32_t w8 __attribute__((vector_size(32)));
      typedef float f8 __attribute__((vector_size(32)));
      return __builtin_convertvector((f8)(__builtin_convertvector(*reinterpret_cast<const h8*>(p), w8) << 16), vec);
    }
  }
};

// s[c] += Σ_r x[r][c] in double over n rows of C values, NV vectors of 8 channels (registers)
template <int NV, typename scalar_t>
inline void column_sums_f64_tile(const scalar_t* __restrict x, int64_t C, int64_t n, double* __restrict s) {
  using vec = V64<double>::v;
  vec a[NV];
  for (int v = 0; v < NV; ++v) a[v] = vec{};
  for (int64_t r = 0; r < n; ++r)
    for (int v = 0; v < NV; ++v) a[v] += VLoadF64<scalar_t>::load(x + r * C + v * 8);
  for (int v = 0; v < NV; ++v) *reinterpret_cast<vec*>(s + v * 8) += a[v];
}

// s[c] += Σ x[r][c] over rows [r0, r1) in memory order, the sums in registers (C a multiple of 8)
template <typename scalar_t>
void column_sums_f64_rows(const scalar_t* x, int64_t C, int64_t r0, int64_t r1, double* s) {
  row_tiles<double, kRowTile>(r0, r1, C, {{reinterpret_cast<const char*>(x), int64_t(sizeof(scalar_t))}},
                              [&](int64_t r, int64_t n, int64_t c, auto NV) {
    column_sums_f64_tile<decltype(NV)::value>(x + r * C + c, C, n, s + c);
  });
}

template <typename scalar_t>
void summed_means(const scalar_t* x, const Layout& l, double* mean_out) {
  const int64_t C = l.C, L = l.L;
  const int nt = at::get_num_threads();
  std::vector<std::vector<double>> part(nt, std::vector<double>(C, 0.0));
  at::parallel_for(0, l.N, 1, [&](int64_t i0, int64_t i1) {
    double* __restrict s = part[at::get_thread_num()].data();
    if (l.rows && C % 8 == 0) return column_sums_f64_rows(x, C, i0 * L, i1 * L, s);
    for (int64_t i = i0; i < i1; ++i) {
      if (l.rows) {
        for (int64_t r = i * L; r < (i + 1) * L; ++r) {
          const scalar_t* __restrict row = x + r * C;
          for (int64_t c = 0; c < C; ++c) s[c] += double(row[c]);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* __restrict plane = x + (i * C + c) * L;
          double a = 0;
#pragma omp simd reduction(+ : a)
          for (int64_t k = 0; k < L; ++k) a += double(plane[k]);
          s[c] += a;
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int t = 0; t < nt; ++t) sum += part[t][c];
    mean_out[c] = sum / double(l.M);
  }
}

// Σ_k f(v_k − m_k), or max_k for p = ∞, over k < len; m_k = mu[k], or the constant m when mu is null.
// The OpenMP simd reductions let the compiler vectorize the maximum (std::max is not associative
// for NaN, so without them it stays scalar).
template <int P, typename acc_t, typename scalar_t>
inline acc_t lp_reduce(const scalar_t* __restrict v, int64_t len, const acc_t* __restrict mu, acc_t m) {
  acc_t a = 0;
  if constexpr (P == 0) {
    if (mu != nullptr) {
#pragma omp simd reduction(max : a)
      for (int64_t k = 0; k < len; ++k) a = std::max(a, std::abs(acc_t(v[k]) - mu[k]));
    } else {
#pragma omp simd reduction(max : a)
      for (int64_t k = 0; k < len; ++k) a = std::max(a, std::abs(acc_t(v[k]) - m));
    }
  } else {
    if (mu != nullptr) {
#pragma omp simd reduction(+ : a)
      for (int64_t k = 0; k < len; ++k) a += lp_term<P, acc_t>(acc_t(v[k]) - mu[k]);
    } else {
#pragma omp simd reduction(+ : a)
      for (int64_t k = 0; k < len; ++k) a += lp_term<P, acc_t>(acc_t(v[k]) - m);
    }
  }
  return a;
}

// t[c] += Σ_r f(x[r][c] − μ[c]) (p = 1, 2), or t[c] = max(t[c], max_r |x[r][c] − μ[c]|) (p = ∞), over n
// rows, NV vectors of channels in registers
template <int P, int NV, typename scalar_t, typename acc_t>
inline void lp_terms_tile(const scalar_t* __restrict x, int64_t C, int64_t n, const acc_t* mu, acc_t* t) {
  using vec = typename V64<acc_t>::v;
  constexpr int L = V64<acc_t>::n;
  vec m[NV], a[NV] = {};
  load_tile(m, mu);
  for (int64_t r = 0; r < n; ++r)
    for (int v = 0; v < NV; ++v) {
      const vec z = VLoad<scalar_t>::load(x + r * C + v * L) - m[v];
      if constexpr (P == 0) {
        const vec az = z < 0 ? -z : z;
        a[v] = a[v] < az ? az : a[v];                       // std::max's NaN rule: a NaN term is skipped
      } else if constexpr (P == 2) {
        a[v] += z * z;
      } else {
        a[v] += z < 0 ? -z : z;
      }
    }
  for (int v = 0; v < NV; ++v) {
    vec& tv = *reinterpret_cast<vec*>(t + v * L);
    if constexpr (P == 0) tv = tv < a[v] ? a[v] : tv;
    else tv += a[v];
  }
}

// h[c] += #{r : |x[r][c] − μ[c]| = top[c]} over n rows (p = ∞'s ties), NV vectors of channels
template <int NV, typename scalar_t, typename acc_t>
inline void lp_ties_tile(const scalar_t* __restrict x, int64_t C, int64_t n, const acc_t* mu, const acc_t* top,
                         acc_t* h) {
  using vec = typename V64<acc_t>::v;
  constexpr int L = V64<acc_t>::n;
  vec m[NV], tp[NV], a[NV] = {};
  load_tile(m, mu), load_tile(tp, top);
  for (int64_t r = 0; r < n; ++r)
    for (int v = 0; v < NV; ++v) {
      const vec z = VLoad<scalar_t>::load(x + r * C + v * L) - m[v];
      a[v] -= __builtin_convertvector((z < 0 ? -z : z) == tp[v], vec);   // true is −1
    }
  for (int v = 0; v < NV; ++v) *reinterpret_cast<vec*>(h + v * L) += a[v];
}

// lp_sample for sample i of the rows layout on register tiles (L ≥ 8, C a multiple of the vector
// width): the terms per channel over the sample's rows (≤ kChunkRows rows summed in acc_t, then in
// double), then per group; p = ∞ counts the ties in a second walk over the sample (cached).
template <int P, typename scalar_t, typename acc_t>
void lp_sample_rows_tiled(const scalar_t* x, const Layout& l, int64_t i, const acc_t* mu, int64_t Cg, double* acc,
                          double* ties) {
  const int64_t C = l.C, L = l.L, G = C / Cg;
  const std::initializer_list<std::pair<const char*, int64_t>> stream = {
      {reinterpret_cast<const char*>(x), int64_t(sizeof(scalar_t))}};
  thread_local avec<acc_t> t, top;
  thread_local std::vector<double> td;
  t.resize(C), top.resize(C);
  td.assign(C, 0.0);
  std::fill(t.begin(), t.end(), acc_t(0));
  for (int64_t r0 = i * L; r0 < (i + 1) * L; r0 += kChunkRows) {
    const int64_t r1 = std::min((i + 1) * L, r0 + kChunkRows);
    if constexpr (P != 0) std::fill(t.begin(), t.end(), acc_t(0));
    row_tiles<acc_t, kRowTile>(r0, r1, C, stream, [&](int64_t r, int64_t n, int64_t c, auto NV) {
      lp_terms_tile<P, decltype(NV)::value>(x + r * C + c, C, n, mu + c, t.data() + c);
    });
    if constexpr (P != 0)
      for (int64_t c = 0; c < C; ++c) td[c] += double(t[c]);
  }
  for (int64_t g = 0; g < G; ++g) {
    acc[g] = 0.0;
    ties[g] = 0.0;
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
      if constexpr (P == 0) acc[g] = std::max(acc[g], double(t[c]));
      else acc[g] += td[c];
    }
  }
  if constexpr (P == 0) {
    for (int64_t c = 0; c < C; ++c) top[c] = acc_t(acc[c / Cg]);       // exact: acc[g] is an acc_t value
    for (int64_t r0 = i * L; r0 < (i + 1) * L; r0 += kChunkRows) {     // counts of ≤ 64 rows: exact in acc_t
      const int64_t r1 = std::min((i + 1) * L, r0 + kChunkRows);
      std::fill(t.begin(), t.end(), acc_t(0));
      row_tiles<acc_t, kRowTile>(r0, r1, C, stream, [&](int64_t r, int64_t n, int64_t c, auto NV) {
        lp_ties_tile<decltype(NV)::value>(x + r * C + c, C, n, mu + c, top.data() + c, t.data() + c);
      });
      for (int64_t c = 0; c < C; ++c) ties[c / Cg] += double(t[c]);
    }
  }
}

// sample i's accumulated terms per group (sum, or max for ∞) and, for ∞, the number of ties
template <int P, typename scalar_t, typename acc_t>
void lp_sample(const scalar_t* x, const Layout& l, int64_t i, const acc_t* mu, int64_t Cg, double* acc, double* ties) {
  const int64_t C = l.C, L = l.L, G = C / Cg;
  if (l.rows && L >= 8 && rows_tiled<acc_t>(C)) return lp_sample_rows_tiled<P>(x, l, i, mu, Cg, acc, ties);
  for (int64_t g = 0; g < G; ++g) { acc[g] = 0.0; ties[g] = 0.0; }
  if (l.rows) {
    for (int64_t r = i * L; r < (i + 1) * L; ++r) {
      const scalar_t* __restrict row = x + r * C;
      for (int64_t g = 0; g < G; ++g) {
        const acc_t a = lp_reduce<P, acc_t, scalar_t>(row + g * Cg, Cg, mu + g * Cg, acc_t(0));
        if constexpr (P == 0) acc[g] = std::max(acc[g], double(a)); else acc[g] += a;
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* __restrict xb = x + (i * C + c) * L;
      const acc_t m = mu[c];
      const int64_t g = c / Cg;
      for (int64_t k0 = 0; k0 < L; k0 += kPlaneBlock) {
        const int64_t k1 = std::min(L, k0 + kPlaneBlock);
        const acc_t a = lp_reduce<P, acc_t, scalar_t>(xb + k0, k1 - k0, nullptr, m);
        if constexpr (P == 0) acc[g] = std::max(acc[g], double(a)); else acc[g] += a;
      }
    }
  }
  if constexpr (P == 0) {                    // how many values reach the maximum (torch's amax splits among them)
    if (l.rows) {
      for (int64_t r = i * L; r < (i + 1) * L; ++r) {
        const scalar_t* __restrict row = x + r * C;
        for (int64_t g = 0; g < G; ++g) {
          const acc_t top = acc_t(acc[g]);       // exact: acc[g] is an acc_t value
          acc_t hits = 0;
#pragma omp simd reduction(+ : hits)
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c)
            hits += acc_t(std::abs(acc_t(row[c]) - mu[c]) == top);
          ties[g] += double(hits);
        }
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* __restrict xb = x + (i * C + c) * L;
        const acc_t m = mu[c], top = acc_t(acc[c / Cg]);
        int64_t hits = 0;
#pragma omp simd reduction(+ : hits)
        for (int64_t k = 0; k < L; ++k) hits += std::abs(acc_t(xb[k]) - m) == top;
        ties[c / Cg] += double(hits);
      }
    }
  }
}

// The backward's pass A on register tiles (images in channels_last: samples of L ≥ 8 rows, C a
// multiple of the vector width): 6 vectors a tile, so tiles of 4 vectors with AVX-512.
#if defined(__AVX512F__)
constexpr int kLpTile = 4;
#else
constexpr int kLpTile = 1;
#endif

// lp_phi on a vector: nk = inv_m/n (p = 2) or n (p = ∞), tk the share of a tie (p = ∞)
template <int P, typename vec>
inline vec lp_phi_vec(vec z, vec inv_m, vec nk, vec tk) {
  const vec sgn = __builtin_convertvector(z < 0, vec) - __builtin_convertvector(z > 0, vec);   // true is −1
  if constexpr (P == 1) return inv_m * sgn;
  else if constexpr (P == 2) return z * nk;
  else {
    const vec az = z < 0 ? -z : z;
    return -__builtin_convertvector(az >= nk, vec) * tk * sgn;
  }
}

// q1 += Σ dy, q2 += Σ dy·z, q3 += Σ φ(z) over n rows of one sample, NV vectors of channels
template <int P, int NV, typename scalar_t, typename acc_t>
inline void lp_grad_sums_tile(const scalar_t* __restrict g, const scalar_t* __restrict x, int64_t C, int64_t n,
                              const acc_t* mu, const acc_t* nk, const acc_t* tk, acc_t inv_m, acc_t* q1, acc_t* q2,
                              acc_t* q3) {
  using vec = typename V64<acc_t>::v;
  constexpr int L = V64<acc_t>::n;
  vec m[NV], nn[NV], tt[NV], a1[NV] = {}, a2[NV] = {}, a3[NV] = {};
  load_tile(m, mu), load_tile(nn, nk), load_tile(tt, tk);
  const vec im = vec{} + inv_m;
  for (int64_t r = 0; r < n; ++r)
    for (int v = 0; v < NV; ++v) {
      const vec gv = VLoad<scalar_t>::load(g + r * C + v * L);
      const vec z = VLoad<scalar_t>::load(x + r * C + v * L) - m[v];
      a1[v] += gv;
      a2[v] += gv * z;
      a3[v] += lp_phi_vec<P>(z, im, nn[v], tt[v]);
    }
  for (int v = 0; v < NV; ++v) {
    *reinterpret_cast<vec*>(q1 + v * L) += a1[v];
    *reinterpret_cast<vec*>(q2 + v * L) += a2[v];
    *reinterpret_cast<vec*>(q3 + v * L) += a3[v];
  }
}

// sample i's constants of φ per channel: nk = inv_m/n (p = 2) or n, tk = 1/(ties at the maximum)
template <int P, typename acc_t>
inline void lp_sample_constants(int64_t i, int64_t C, int64_t G, const std::vector<double>& n,
                                const std::vector<double>& ties, acc_t im, acc_t* nk, acc_t* tk) {
  const int64_t Cg = C / G;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t g = c / Cg;
    const acc_t ni = acc_t(n[i * G + g]);
    nk[c] = P == 2 ? im / ni : ni;
    tk[c] = acc_t(1.0 / std::max(ties[i * G + g], 1.0));
  }
}

// dx = dy·a + κ·φ(z) + shift over n rows of one sample, NV vectors of channels (T = float or double)
template <int P, int NV, typename T>
inline void lp_dx_tile(const T* __restrict g, const T* __restrict x, T* __restrict dx, int64_t C, int64_t n,
                       const T* mu, const T* a, const T* kap, const T* sh, const T* nk, const T* tk, T inv_m) {
  using vec = typename V64<T>::v;
  constexpr int L = V64<T>::n;
  vec m[NV], av[NV], kv[NV], sv[NV], nn[NV], tt[NV];
  load_tile(m, mu), load_tile(av, a), load_tile(kv, kap), load_tile(sv, sh), load_tile(nn, nk), load_tile(tt, tk);
  const vec im = vec{} + inv_m;
  for (int64_t r = 0; r < n; ++r)
    for (int v = 0; v < NV; ++v) {
      const vec z = *reinterpret_cast<const vec*>(x + r * C + v * L) - m[v];
      *reinterpret_cast<vec*>(dx + r * C + v * L) =
          *reinterpret_cast<const vec*>(g + r * C + v * L) * av[v] + kv[v] * lp_phi_vec<P>(z, im, nn[v], tt[v]) + sv[v];
    }
}

// Pass B over samples [i0, i1) of the rows layout on register tiles (see lp_grad_sums_rows_tiled)
template <int P, typename T>
void lp_dx_rows_tiled(const T* gp, const T* xp, T* dxp, const Layout& l, int64_t i0, int64_t i1, int64_t G,
                      const T* mv, const T* av, const T* kv, const T* sv, const std::vector<double>& n,
                      const std::vector<double>& ties, T im) {
  const int64_t C = l.C, L = l.L;
  thread_local avec<T> nk, tk;
  nk.resize(C), tk.resize(C);
  const int64_t sz = sizeof(T);
  for (int64_t i = i0; i < i1; ++i) {
    lp_sample_constants<P>(i, C, G, n, ties, im, nk.data(), tk.data());
    row_tiles<T, kLpTile>(i * L, (i + 1) * L, C,
                          {{reinterpret_cast<const char*>(gp), sz}, {reinterpret_cast<const char*>(xp), sz}},
                          [&](int64_t r, int64_t nr, int64_t c, auto NV) {
      lp_dx_tile<P, decltype(NV)::value>(gp + r * C + c, xp + r * C + c, dxp + r * C + c, C, nr, mv + c, av + c,
                                         kv + c, sv + c, nk.data() + c, tk.data() + c, im);
    });
  }
}

// Pass A over samples [i0, i1) of the rows layout on register tiles: per sample its constants (n
// or inv_m/n, and the share of a tie, per channel), its rows ≤ kChunkRows at a time summed in acc_t,
// then added to the thread's double sums s1, s2, s3. (A function of its own: captured by the tiles'
// lambdas, the caller's locals would escape and its scalar loops stop vectorizing.)
template <int P, typename scalar_t, typename acc_t>
void lp_grad_sums_rows_tiled(const scalar_t* gp, const scalar_t* xp, const Layout& l, int64_t i0, int64_t i1,
                             int64_t G, const acc_t* mv, const std::vector<double>& n, const std::vector<double>& ties,
                             acc_t im, double* s1, double* s2, double* s3) {
  const int64_t C = l.C, L = l.L;
  thread_local avec<acc_t> c1, c2, c3, nk, tk;
  c1.resize(C), c2.resize(C), c3.resize(C), nk.resize(C), tk.resize(C);
  const int64_t sz = sizeof(scalar_t);
  for (int64_t i = i0; i < i1; ++i) {
    lp_sample_constants<P>(i, C, G, n, ties, im, nk.data(), tk.data());
    for (int64_t r0 = i * L; r0 < (i + 1) * L; r0 += kChunkRows) {
      const int64_t r1 = std::min((i + 1) * L, r0 + kChunkRows);
      std::fill(c1.begin(), c1.end(), acc_t(0));
      std::fill(c2.begin(), c2.end(), acc_t(0));
      std::fill(c3.begin(), c3.end(), acc_t(0));
      row_tiles<acc_t, kLpTile>(r0, r1, C,
                                {{reinterpret_cast<const char*>(gp), sz}, {reinterpret_cast<const char*>(xp), sz}},
                                [&](int64_t r, int64_t nr, int64_t c, auto NV) {
        lp_grad_sums_tile<P, decltype(NV)::value>(gp + r * C + c, xp + r * C + c, C, nr, mv + c, nk.data() + c,
                                                  tk.data() + c, im, c1.data() + c, c2.data() + c, c3.data() + c);
      });
      for (int64_t c = 0; c < C; ++c) { s1[c] += c1[c]; s2[c] += c2[c]; s3[c] += c3[c]; }
    }
  }
}

// φ = ∂n_ig/∂z for one value; share_of_tie (p = ∞): 1 / the number of values at the maximum
template <int P, typename acc_t>
inline acc_t lp_phi(acc_t z, acc_t inv_m, acc_t n, acc_t share_of_tie) {
  // branch-free (signs are random: a branch mispredicts half the time and stops vectorization)
  if constexpr (P == 1) return inv_m * (acc_t(z > 0) - acc_t(z < 0));
  else if constexpr (P == 2) return z * (inv_m / n);
  else {
    const acc_t at_max = acc_t(std::abs(z) >= n);          // n is the maximum: >= is ==
    return at_max * share_of_tie * (acc_t(z > 0) - acc_t(z < 0));
  }
}

template <int P, typename scalar_t>
void lp_forward_impl(const at::Tensor& x, const Layout& l, int64_t G, double eps, const std::vector<double>& mean,
                     std::vector<double>& n, std::vector<double>& ties, std::vector<double>& D,
                     const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = l.N, C = l.C, Cg = C / G;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  std::vector<acc_t> mu(C);
  for (int64_t c = 0; c < C; ++c) mu[c] = acc_t(mean[c]);
  const double m = double(Cg * l.L);
  at::parallel_for(0, N, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double* acc = n.data() + i * G;
      lp_sample<P, scalar_t, acc_t>(xp, l, i, mu.data(), Cg, acc, ties.data() + i * G);
      for (int64_t g = 0; g < G; ++g)
        acc[g] = P == 1 ? acc[g] / m : (P == 2 ? std::sqrt(acc[g] / m) : acc[g]);
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    double d = 0;
    for (int64_t i = 0; i < N; ++i) d += n[i * G + g];
    D[g] = d / double(N) + eps;
  }
  std::vector<double> invD(C);
  for (int64_t c = 0; c < C; ++c) invD[c] = 1.0 / D[c / Cg];
  std::vector<acc_t> alpha, beta;
  coefficients<acc_t>(mean.data(), invD.data(), weight, bias, C, alpha, beta);
  affine<scalar_t>(xp, y.data_ptr<scalar_t>(), l, alpha, beta, kIdentity, 0.0, /*training=*/true);
}

template <int P, typename scalar_t>
void lp_backward_impl(const at::Tensor& dy, const at::Tensor& x, const Layout& l, int64_t G,
                      const std::vector<double>& mean, const std::vector<double>& n, const std::vector<double>& ties,
                      const std::vector<double>& D, const std::vector<double>& w, at::Tensor& dx,
                      std::vector<double>& S1, std::vector<double>& S2) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t N = l.N, C = l.C, L = l.L, Cg = C / G;
  const scalar_t* gp = dy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  std::vector<acc_t> mu(C);
  for (int64_t c = 0; c < C; ++c) mu[c] = acc_t(mean[c]);
  const acc_t* __restrict mv = mu.data();
  const acc_t inv_m = acc_t(1.0 / double(Cg * L));
  const bool tiled = l.rows && L >= 8 && rows_tiled<acc_t>(C);
  // pass A: Σdy, Σdy·z and Σφ per channel (per-thread partials, summed in thread order)
  const int nt = at::get_num_threads();
  std::vector<std::vector<double>> p1(nt, std::vector<double>(C, 0.0)), p2(nt, std::vector<double>(C, 0.0)),
      p3(nt, std::vector<double>(C, 0.0));
  at::parallel_for(0, N, 1, [&](int64_t i0, int64_t i1) {
    const int tid = at::get_thread_num();
    const acc_t im = inv_m;                  // a local copy: a captured reference would be reloaded
    double* s1 = p1[tid].data();
    double* s2 = p2[tid].data();
    double* s3 = p3[tid].data();
    // rows layout: sums in acc_t over whole samples, ≥ kChunkRows rows at a time, then added to
    // the double partials (a flush per sample cost more than the sample's work when L = 1)
    if (tiled) return lp_grad_sums_rows_tiled<P>(gp, xp, l, i0, i1, G, mv, n, ties, inv_m, s1, s2, s3);
    std::vector<acc_t> b1(l.rows ? C : 0, acc_t(0)), b2(b1), b3(b1);
    int64_t pending = 0;                       // rows summed into b1..b3 since the last flush
    auto flush = [&] {
      for (int64_t c = 0; c < C; ++c) { s1[c] += b1[c]; s2[c] += b2[c]; s3[c] += b3[c]; }
      std::fill(b1.begin(), b1.end(), acc_t(0));
      std::fill(b2.begin(), b2.end(), acc_t(0));
      std::fill(b3.begin(), b3.end(), acc_t(0));
      pending = 0;
    };
    for (int64_t i = i0; i < i1; ++i) {
      if (l.rows) {                          // rows of C values: channels innermost, contiguous
        acc_t* __restrict q1 = b1.data();
        acc_t* __restrict q2 = b2.data();
        acc_t* __restrict q3 = b3.data();
        for (int64_t r = i * L; r < (i + 1) * L; ++r) {
          const scalar_t* __restrict gr = gp + r * C;
          const scalar_t* __restrict xr = xp + r * C;
          for (int64_t g = 0; g < G; ++g) {
            const acc_t ni = acc_t(n[i * G + g]), ti = acc_t(1.0 / std::max(ties[i * G + g], 1.0));
            for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
              const acc_t gv = acc_t(gr[c]), z = acc_t(xr[c]) - mv[c];
              q1[c] += gv;
              q2[c] += gv * z;
              if constexpr (P != 0) q3[c] += lp_phi<P, acc_t>(z, im, ni, ti);
            }
            if constexpr (P == 0)            // φ ≠ 0 only at the maximum: a rare, predictable branch
              for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                const acc_t z = acc_t(xr[c]) - mv[c];
                if (std::abs(z) >= ni) q3[c] += lp_phi<P, acc_t>(z, im, ni, ti);
              }
          }
        }
        pending += L;
        if (pending >= kChunkRows || i + 1 == i1) flush();
        continue;
      }
      for (int64_t g = 0; g < G; ++g) {
        const acc_t ni = acc_t(n[i * G + g]), ti = acc_t(1.0 / std::max(ties[i * G + g], 1.0));
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          const scalar_t* __restrict gb = gp + (i * C + c) * L;
          const scalar_t* __restrict xb = xp + (i * C + c) * L;
          const acc_t m = mv[c];
          acc_t a1 = 0, a2 = 0, a3 = 0;
          for (int64_t k = 0; k < L; ++k) {
            const acc_t gv = acc_t(gb[k]), z = acc_t(xb[k]) - m;
            a1 += gv;
            a2 += gv * z;
            a3 += lp_phi<P, acc_t>(z, im, ni, ti);
          }
          s1[c] += a1;
          s2[c] += a2;
          s3[c] += a3;
        }
      }
    }
  });
  std::vector<double> Phi(C);
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0, t2 = 0, t3 = 0;
    for (int t = 0; t < nt; ++t) { t1 += p1[t][c]; t2 += p2[t][c]; t3 += p3[t][c]; }
    S1[c] = t1; S2[c] = t2; Phi[c] = t3;
  }
  std::vector<double> kappa(G, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t g = c / Cg;
    kappa[g] -= (w.empty() ? 1.0 : w[c]) * S2[c] / (double(N) * D[g] * D[g]);
  }
  std::vector<acc_t> a(C), shift(C), kap(C);
  const double count = double(N * L);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t g = c / Cg;
    const double ac = (w.empty() ? 1.0 : w[c]) / D[g];
    a[c] = acc_t(ac);
    kap[c] = acc_t(kappa[g]);
    shift[c] = acc_t(-(ac * S1[c] + kappa[g] * Phi[c]) / count);
  }
  // pass B: dx = dy·a + κ·φ(z) − mean(dz)
  const acc_t* __restrict av = a.data();
  const acc_t* __restrict kv = kap.data();
  const acc_t* __restrict sv = shift.data();
  at::parallel_for(0, N, 1, [&](int64_t i0, int64_t i1) {
    const acc_t im = inv_m;
    if constexpr (std::is_same<scalar_t, acc_t>::value) {       // vector stores: float and double
      if (tiled) return lp_dx_rows_tiled<P>(gp, xp, dxp, l, i0, i1, G, mv, av, kv, sv, n, ties, inv_m);
    }
    for (int64_t i = i0; i < i1; ++i) {
      if (l.rows) {
        for (int64_t r = i * L; r < (i + 1) * L; ++r) {
          const scalar_t* __restrict gr = gp + r * C;
          const scalar_t* __restrict xr = xp + r * C;
          scalar_t* __restrict dr = dxp + r * C;
          for (int64_t g = 0; g < G; ++g) {
            const acc_t ni = acc_t(n[i * G + g]), ti = acc_t(1.0 / std::max(ties[i * G + g], 1.0));
            for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
              const acc_t z = acc_t(xr[c]) - mv[c];
              const acc_t phi = P == 0 ? acc_t(0) : lp_phi<P, acc_t>(z, im, ni, ti);
              dr[c] = scalar_t(acc_t(gr[c]) * av[c] + kv[c] * phi + sv[c]);
            }
            if constexpr (P == 0)
              for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                const acc_t z = acc_t(xr[c]) - mv[c];
                if (std::abs(z) >= ni)
                  dr[c] = scalar_t(acc_t(gr[c]) * av[c] + kv[c] * lp_phi<P, acc_t>(z, im, ni, ti) + sv[c]);
              }
          }
        }
        continue;
      }
      for (int64_t g = 0; g < G; ++g) {
        const acc_t ni = acc_t(n[i * G + g]), ti = acc_t(1.0 / std::max(ties[i * G + g], 1.0));
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          const acc_t ac = av[c], kc = kv[c], sc = sv[c], m = mv[c];
          const int64_t base = (i * C + c) * L;
          const scalar_t* __restrict gb = gp + base;
          const scalar_t* __restrict xb = xp + base;
          scalar_t* __restrict db = dxp + base;
          for (int64_t k = 0; k < L; ++k) {
            const acc_t z = acc_t(xb[k]) - m;
            db[k] = scalar_t(acc_t(gb[k]) * ac + kc * lp_phi<P, acc_t>(z, im, ni, ti) + sc);
          }
        }
      }
    }
  });
}

}  // namespace

namespace {

// What ℓp's backward needs from its forward: μ (C), n (N·G), ties (N·G), D (G)
struct LpStats {
  std::vector<double> mean, n, ties, D;
};

// ℓp's training forward: y, and the statistics in *st; p = 1, 2 or 0 (∞)
at::Tensor lp_forward(const at::Tensor& x, int64_t p, int64_t groups, double eps,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, LpStats* st) {
  const Layout l = layout_of(x);
  TORCH_CHECK(groups >= 1 && l.C % groups == 0, "bnlab kernel: channels must split into the groups");
  TORCH_CHECK(p == 0 || p == 1 || p == 2, "bnlab kernel: p must be 1, 2 or 0 (inf)");
  const int64_t N = l.N, C = l.C, G = groups;
  st->mean.assign(C, 0.0), st->n.assign(N * G, 0.0), st->ties.assign(N * G, 1.0), st->D.assign(G, 0.0);
  at::Tensor y = empty_out(x, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_lp_forward", [&] {
    summed_means<scalar_t>(x.data_ptr<scalar_t>(), l, st->mean.data());
    const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
    if (p == 1) lp_forward_impl<1, scalar_t>(x, l, G, eps, st->mean, st->n, st->ties, st->D, w, b, y);
    else if (p == 2) lp_forward_impl<2, scalar_t>(x, l, G, eps, st->mean, st->n, st->ties, st->D, w, b, y);
    else lp_forward_impl<0, scalar_t>(x, l, G, eps, st->mean, st->n, st->ties, st->D, w, b, y);
  });
  return y;
}

// dx of lp_forward; *dgamma = Σ dy·(x − μ)/D, *dbeta = Σ dy (C each)
at::Tensor lp_backward(const at::Tensor& dy_in, const at::Tensor& x, const LpStats& st, const at::Tensor& weight,
                       int64_t p, int64_t groups, std::vector<double>* dgamma, std::vector<double>* dbeta) {
  const Layout l = layout_of(x);
  const int64_t C = l.C, G = groups;
  const at::Tensor dy = in_layout_of(dy_in, x);
  const std::vector<double> w = weight.defined() ? to_vec(weight, C) : std::vector<double>();
  std::vector<double> S2(C);
  dbeta->assign(C, 0.0);
  at::Tensor dx = empty_out(x, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_lp_backward", [&] {
    if (p == 1) lp_backward_impl<1, scalar_t>(dy, x, l, G, st.mean, st.n, st.ties, st.D, w, dx, *dbeta, S2);
    else if (p == 2) lp_backward_impl<2, scalar_t>(dy, x, l, G, st.mean, st.n, st.ties, st.D, w, dx, *dbeta, S2);
    else lp_backward_impl<0, scalar_t>(dy, x, l, G, st.mean, st.n, st.ties, st.D, w, dx, *dbeta, S2);
  });
  dgamma->resize(C);
  for (int64_t c = 0; c < C; ++c) (*dgamma)[c] = S2[c] / st.D[c / (C / G)];
  return dx;
}

}  // namespace

// Per-group BN backward, y = (x − mean_g)·invstd_g·w_g + b_g, with the statistics the groups' own
// (project = true: BN's closed form per group, dx = w·invstd·(dy − mean(dy) − x̂·mean(dy·x̂))) or
// constants (project = false: dx = w·invstd·dy, the eval transform's backward in dispatch._EvalFn).
// Returns (dx, Σdy·x̂ (G, C), Σdy (G, C)).
std::vector<at::Tensor> group_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& mean_t,
                                       const at::Tensor& invstd_t, const c10::optional<at::Tensor>& weight,
                                       const std::vector<int64_t>& sizes, bool project) {
  const Layout l = layout_of(x);
  const Groups gr = groups_of(l, sizes);
  const int64_t G = int64_t(sizes.size()), C = l.C, per_row = l.C * l.L;
  const at::Tensor dy = in_layout_of(dy_in, x);
  const std::vector<double> mean = per_group(mean_t, G, C), invstd = per_group(invstd_t, G, C);
  const std::vector<double> w = per_group(weight, G, C);
  std::vector<double> sxh(G * C), sdy(G * C), s1(C), s2(C);
  at::Tensor dx = empty_out(x, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_group_backward", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    std::vector<acc_t> k1(C), k2(C), k3(C);
    for (int64_t g = 0; g < G; ++g) {
      const Layout lg = slice_layout(l, gr.size[g]);
      const int64_t off = gr.start[g] * per_row;
      const double* mg = mean.data() + g * C;
      if (l.rows) grad_sums_rows<scalar_t>(dyp + off, xp + off, mg, lg, s1.data(), s2.data());
      else grad_sums_ncl<scalar_t>(dyp + off, xp + off, mg, lg, s1.data(), s2.data());
      const double m = double(lg.M);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = g * C + c;
        const double scale = invstd[i] * (w.empty() ? 1.0 : w[i]);
        const double kk = project ? invstd[i] * invstd[i] * s2[c] / m : 0.0;
        k1[c] = acc_t(scale);
        k2[c] = acc_t(-scale * kk);
        k3[c] = acc_t(project ? -scale * s1[c] / m + scale * kk * mg[c] : 0.0);
        sxh[i] = s2[c] * invstd[i];
        sdy[i] = s1[c];
      }
      dx_pass<scalar_t>(dyp + off, xp + off, dxp + off, lg, k1, k2, k3);
    }
  });
  const auto acc = acc_type(x.scalar_type());
  return {dx, mat(sxh, G, C, acc), mat(sdy, G, C, acc)};
}

// Whether the incoming gradient dy can be overwritten with dx: the same test torch's autograd
// engine makes before accumulating gradients in place (InputBuffer): a plain dense strided tensor
// on the CPU whose TensorImpl and storage have exactly one reference each — the caller's — so no
// other tensor, view, hook, saved variable or Python object can see the change. A dy the user
// still holds (y.backward(dy)) fails it and is never written; so does a node post-hook (the engine
// then keeps a copy of the gradients for the hook). An inference tensor is never handed on as dx.
bool dy_dead_for(const at::Tensor& dy, const at::Tensor& x) {
  return dy.defined() && dy.layout() == at::kStrided && dy.device().is_cpu() && !dy.is_nested() &&
         !at::isTensorSubclassLike(dy) && !dy._is_zerotensor() && !dy.is_conj() && !dy.is_neg() &&
         !dy.requires_grad() && !dy.is_inference() && dy.use_count() == 1 && dy.has_storage() && dy.storage().use_count() == 1 &&
         dy.is_non_overlapping_and_dense() && dy.scalar_type() == x.scalar_type() && dy.sizes() == x.sizes() &&
         dy.strides() == x.strides() && !dy.is_same(x);
}

// ---------------------------------------------------------------------------------------------
// Fused BN + activation backward (In-Place Activated BatchNorm, Rota Bulò et al. 2018).
// Per element the kernel recovers what the forward did not keep:
//   from the output a = act(z), when act is invertible (identity, leaky ReLU with slope > 0):
//                     z = act⁻¹(a), dz = da·act'(a), x̂ = (z − β)/γ    (γ ≠ 0 by construction)
//   from the input x, when it is not (ReLU, leaky ReLU with slope ≤ 0 — a negative slope maps
//   both signs of z to a ≥ 0):  x̂ = (x − μ)·invstd, z = γx̂ + β, dz = da·(z > 0 ? 1 : slope)
// then BN's closed form: dx = γ·invstd·(dz − Σdz/m − x̂·Σ(dz·x̂)/m), dγ = Σdz·x̂, dβ = Σdz.
// Two passes, like BN's backward: the sums, then dx (recomputing dz, x̂ on the fly).
// ---------------------------------------------------------------------------------------------

enum Recovery { kFromOutputIdentity = 0, kFromInput = 1, kFromOutputLeaky = 2, kFromInputRelu = 3 };
// At z = NaN the masks follow torch's backward: ReLU's passes the gradient (threshold_backward
// zeroes it only where z ≤ 0), the leaky ReLU's scales it by the slope (it passes it only where z > 0).

// The recovery is a template parameter and every per-element step is a multiply or a select of
// constants (no division, no data-dependent branch), so the loops vectorize.
template <typename acc_t, int MODE>
struct Recover {
  acc_t slope, inv_slope;
  // (dz, x̂) for one element: g = upstream gradient, v = a (from the output) or x (from the input)
  inline void operator()(acc_t g, acc_t v, acc_t gamma, acc_t inv_gamma, acc_t beta, acc_t mu, acc_t invstd,
                         acc_t& dz, acc_t& xh) const {
    if (MODE == kFromInputRelu) {
      xh = (v - mu) * invstd;
      const acc_t z = gamma * xh + beta;
      dz = g * static_cast<acc_t>(!(z <= acc_t(0)));
    } else if (MODE == kFromInput) {
      xh = (v - mu) * invstd;
      const acc_t z = gamma * xh + beta;
      const acc_t pos = static_cast<acc_t>(z > acc_t(0));
      dz = g * (slope + pos * (acc_t(1) - slope));
    } else if (MODE == kFromOutputLeaky) {
      // the sign as arithmetic (a compare mask), not a branch: random signs would mispredict half
      // the time and keep the loop scalar — measured 40× slower than this form
      const acc_t neg = static_cast<acc_t>(!(v >= acc_t(0)));
      const acc_t z = v * (acc_t(1) + neg * (inv_slope - acc_t(1)));
      dz = g * (acc_t(1) + neg * (slope - acc_t(1)));
      xh = (z - beta) * inv_gamma;
    } else {
      dz = g;
      xh = (v - beta) * inv_gamma;
    }
  }
};

template <typename scalar_t, int MODE>
std::vector<at::Tensor> bn_act_backward_impl(const at::Tensor& da, const at::Tensor& v, const Layout& l,
                                             const std::vector<double>& gamma, const std::vector<double>& beta,
                                             const std::vector<double>& mu, const std::vector<double>& invstd,
                                             double slope) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t C = l.C;
  const Recover<acc_t, MODE> rec{acc_t(slope), MODE == kFromOutputLeaky ? acc_t(1.0 / slope) : acc_t(0)};
  std::vector<acc_t> g(C), ig(C), b(C), m(C), inv(C);
  for (int64_t c = 0; c < C; ++c) {
    g[c] = acc_t(gamma[c]); ig[c] = acc_t(1.0 / gamma[c]); b[c] = acc_t(beta[c]);
    m[c] = acc_t(mu[c]); inv[c] = acc_t(invstd[c]);
  }
  const scalar_t* dap = da.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const int nt = at::get_num_threads();
  std::vector<std::vector<double>> s1(nt, std::vector<double>(C, 0.0)), s2(nt, std::vector<double>(C, 0.0));
  // pass 1: Σdz, Σdz·x̂ (rows layout: wide rows, per-channel constants tiled, float sums per chunk)
  const Wide w = wide_rows(C);
  if (l.rows) {
    const avec<acc_t> gt = tiled(g, w.k), igt = tiled(ig, w.k), bt = tiled(b, w.k), mt = tiled(m, w.k),
                             invt = tiled(inv, w.k);
    const int64_t R = w.R;
    at::parallel_for(0, (l.M + R - 1) / R, 1, [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      thread_local avec<acc_t> a1, a2;
      a1.resize(w.W);
      a2.resize(w.W);
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t r0 = bi * R, r1 = std::min(l.M, r0 + R);
        std::fill(a1.begin(), a1.end(), acc_t(0));
        std::fill(a2.begin(), a2.end(), acc_t(0));
        wide_chunk(w, C, r0, r1, [&](int64_t r, int64_t n, int64_t width) {
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t* __restrict dar = dap + r * C + i * width;
            const scalar_t* __restrict vr = vp + r * C + i * width;
            for (int64_t c = 0; c < width; ++c) {
              acc_t dz, xh;
              rec(acc_t(dar[c]), acc_t(vr[c]), gt[c], igt[c], bt[c], mt[c], invt[c], dz, xh);
              a1[c] += dz;
              a2[c] += dz * xh;
            }
          }
        });
        fold(a1.data(), C, w.k);
        fold(a2.data(), C, w.k);
        for (int64_t c = 0; c < C; ++c) {
          s1[tid][c] += a1[c];
          s2[tid][c] += a2[c];
        }
      }
    });
  } else {
    const int64_t L = l.L;
    at::parallel_for(0, l.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L)), [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t c = bi % C;
        const acc_t gc = g[c], igc = ig[c], bc = b[c], mc = m[c], ic = inv[c];
        for (int64_t k0 = 0; k0 < L; k0 += kPlaneBlock) {           // float sums of ≤ kPlaneBlock terms
          const int64_t k1 = std::min(L, k0 + kPlaneBlock);
          acc_t a1 = 0, a2 = 0;
          for (int64_t k = k0; k < k1; ++k) {
            acc_t dz, xh;
            rec(acc_t(dap[bi * L + k]), acc_t(vp[bi * L + k]), gc, igc, bc, mc, ic, dz, xh);
            a1 += dz;
            a2 += dz * xh;
          }
          s1[tid][c] += a1;
          s2[tid][c] += a2;
        }
      }
    });
  }
  std::vector<double> sdz(C, 0.0), sdzx(C, 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) { sdz[c] += s1[t][c]; sdzx[c] += s2[t][c]; }
  // pass 2: dx
  const double M = double(l.M);
  std::vector<acc_t> scale(C), k1(C), k2(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = acc_t(gamma[c] * invstd[c]);
    k1[c] = acc_t(sdz[c] / M);
    k2[c] = acc_t(sdzx[c] / M);
  }
  at::Tensor dx = empty_out(v, v.scalar_type());
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  if (l.rows) {
    const avec<acc_t> gt = tiled(g, w.k), igt = tiled(ig, w.k), bt = tiled(b, w.k), mt = tiled(m, w.k),
                             invt = tiled(inv, w.k), st = tiled(scale, w.k), k1t = tiled(k1, w.k),
                             k2t = tiled(k2, w.k);
    parallel_wide_rows(l, w, [&](int64_t r, int64_t n) {
      const scalar_t* __restrict dar = dap + r * C;
      const scalar_t* __restrict vr = vp + r * C;
      scalar_t* __restrict o = dxp + r * C;
      for (int64_t c = 0; c < n; ++c) {
        acc_t dz, xh;
        rec(acc_t(dar[c]), acc_t(vr[c]), gt[c], igt[c], bt[c], mt[c], invt[c], dz, xh);
        o[c] = scalar_t(st[c] * (dz - k1t[c] - xh * k2t[c]));
      }
    });
  } else {
    const int64_t L = l.L;
    at::parallel_for(0, l.N * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, L)), [&](int64_t b0, int64_t b1) {
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t c = bi % C;
        const acc_t gc = g[c], igc = ig[c], bc = b[c], mc = m[c], ic = inv[c];
        const acc_t sc = scale[c], k1c = k1[c], k2c = k2[c];
        for (int64_t k = 0; k < L; ++k) {
          acc_t dz, xh;
          rec(acc_t(dap[bi * L + k]), acc_t(vp[bi * L + k]), gc, igc, bc, mc, ic, dz, xh);
          dxp[bi * L + k] = scalar_t(sc * (dz - k1c - xh * k2c));
        }
      }
    });
  }
  const auto acc = acc_type(v.scalar_type());
  return {dx, vec(sdzx, acc), vec(sdz, acc)};
}

// da: gradient w.r.t. the layer's output; v: the saved input x (from_input: ReLU, leaky ReLU with
// slope ≤ 0) or output a (identity, leaky ReLU with slope > 0). Returns (dx, dγ, dβ).
std::vector<at::Tensor> bn_act_backward(const at::Tensor& da_in, const at::Tensor& v, const at::Tensor& mean,
                                        const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                                        int64_t act, double slope, bool from_input) {
  const Layout l = layout_of(v);
  TORCH_CHECK(from_input || act == kIdentity || (act == kLeakyRelu && slope > 0),
              "bn_act_backward: only the identity and a leaky ReLU with slope > 0 can be inverted from "
              "the output; keep the input (from_input=True) for ", act == kRelu ? "ReLU" : "this slope");
  const double input_slope = act == kRelu ? 0.0 : (act == kLeakyRelu ? slope : 1.0);
  const at::Tensor da = in_layout_of(da_in, v);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, v.scalar_type(), "bnlab_bn_act_backward", [&] {
    const auto w = to_vec(weight, l.C), b = to_vec(bias, l.C), m = to_vec(mean, l.C), i = to_vec(invstd, l.C);
    if (from_input && act == kRelu) out = bn_act_backward_impl<scalar_t, kFromInputRelu>(da, v, l, w, b, m, i, 0.0);
    else if (from_input) out = bn_act_backward_impl<scalar_t, kFromInput>(da, v, l, w, b, m, i, input_slope);
    else if (act == kLeakyRelu) out = bn_act_backward_impl<scalar_t, kFromOutputLeaky>(da, v, l, w, b, m, i, slope);
    else out = bn_act_backward_impl<scalar_t, kFromOutputIdentity>(da, v, l, w, b, m, i, slope);
  });
  return out;
}

// Release every cached region (returns the bytes released); report the cache's size.
int64_t empty_cache() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  int64_t freed = pool_bytes;
  for (auto& r : pool) munmap(r.ptr, r.len);
  pool.clear();
  pool_bytes = 0;
  return freed;
}

std::vector<int64_t> cache_info() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  return {int64_t(pool.size()), pool_bytes, pool_cap()};
}

// ---------------------------------------------------------------------------------------------
// Training BN as a C++ autograd node. The Python autograd.Function around the two kernels cost
// about 0.3 ms a step on a 12–16 MB batch (`bnlab bench passes`: "bnlab step, kernels" vs
// "autograd"); through this node 0.16–0.27 ms. Here only the forward's call is Python. When the backward itself must be differentiable
// (create_graph=True, GradMode on in backward), the node calls bnlab's definition
// (functional._train_backward_graph, registered at import) — the closed form evaluated with
// torch ops on statistics recomputed from x, so autograd can differentiate it again.
// ---------------------------------------------------------------------------------------------

std::atomic<int64_t> node_backward_calls{0};                // backward_train calls made by the node
std::atomic<int64_t> node_inplace_calls{0};                 // ... of which wrote dx over dy (dead, or a copy)
std::atomic<bool> dx_over_dy{true};                         // the node may write dx over dy (ablation switch)

py::object& graph_backward() {
  static py::object* fn = new py::object();             // never destroyed: no Python at exit
  return *fn;
}

inline at::Tensor tensor_or_undefined(py::handle h) { return h.is_none() ? at::Tensor() : h.cast<at::Tensor>(); }

struct TrainBN : public torch::autograd::Function<TrainBN> {
  // optional tensors, not undefined ones: Function::apply needs a device for every tensor argument
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                            double eps, const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, double momentum, bool unbiased) {
    // the kernels only read γ and β (autograd is off inside forward): no detached aliases needed
    auto opt = [](const c10::optional<at::Tensor>& t) {
      return t.has_value() && t->defined() ? t : c10::nullopt;
    };
    std::vector<at::Tensor> out = forward_train(x, opt(weight), opt(bias), eps, 0, 0.0, running_mean, running_var,
                                                momentum, unbiased);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), out[1], out[3]});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias_dtype"] = bias.has_value() && bias->defined() ? int64_t(bias->scalar_type()) : int64_t(-1);
    if (bias.has_value() && bias->defined() && bias->dim() != 1) ctx->saved_data["bias_sizes"] = bias->sizes().vec();
    ctx->set_materialize_grads(false);
    return out[0];
  }

  // grads by reference: CppNode passes the engine's buffer, which it moved in, so grads[0] holds
  // dy's only reference exactly when no one else can see dy (dy_dead_for).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    const at::Tensor& dy = grads[0];
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3];
    // needs_input_grad counts the tensor arguments that were given (x, then weight and bias if any)
    const bool has_w = weight.defined(), has_b = ctx->saved_data["bias_dtype"].toInt() >= 0;
    const bool need_dx = ctx->needs_input_grad(0), need_dw = has_w && ctx->needs_input_grad(1),
               need_db = has_b && ctx->needs_input_grad(has_w ? 2 : 1);
    torch::autograd::variable_list result(8);                  // one per forward argument
    if (!dy.defined()) return result;
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {                            // a graph of the backward: the definition
      py::gil_scoped_acquire gil;
      py::tuple r = graph_backward()(dy, x, weight.defined() ? py::cast(weight) : py::none(),
                                     ctx->saved_data["eps"].toDouble(), need_dx, need_dw, need_db);
      dx = tensor_or_undefined(r[0]), dw = tensor_or_undefined(r[1]), db = tensor_or_undefined(r[2]);
    } else {
      node_backward_calls.fetch_add(1);
      bool wrote_over_dy = false;
      std::vector<at::Tensor> g = backward_train_impl(dy, x, mean, invstd,
                                                      weight.defined() ? c10::optional<at::Tensor>(weight)
                                                                       : c10::nullopt,
                                                      need_dx && dy_dead_for(dy, x), &wrote_over_dy,
                                                      dx_over_dy.load());
      if (wrote_over_dy) node_inplace_calls.fetch_add(1);
      dx = g[0], dw = g[1], db = g[2];
    }
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    // (each .to is a dispatcher call even when it changes nothing, and small calls are not free
    // right after a large kernel has flushed the caches)
    auto as = [](const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); };
    if (need_dx) result[0] = as(dx, x.scalar_type());
    // a weight of another shape with C values (torch.nn accepts (1, C)) gets its gradient in that shape
    if (need_dw && dw.defined()) result[1] = as(dw, weight.scalar_type()).view(weight.sizes());
    if (need_db && db.defined() && bias_dtype >= 0) {
      result[2] = as(db, at::ScalarType(bias_dtype));
      if (ctx->saved_data.count("bias_sizes")) result[2] = result[2].view(ctx->saved_data["bias_sizes"].toIntVector());
    }
    return result;
  }
};

at::Tensor batch_norm_train(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, double eps,
                            const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                            double momentum, bool unbiased) {
  TORCH_CHECK(graph_backward() && !graph_backward().is_none(), "batch_norm_train: set_graph_backward was not called");
  return TrainBN::apply(x, weight, bias, eps, running_mean, running_var, momentum, unbiased);
}

// ---------------------------------------------------------------------------------------------
// The grouped variants' training step as one C++ autograd node (variants/_grouped.py): Ghost BN,
// Batch Renorm and DetachedNorm. Per group g of consecutive examples,
//     y = (x − μ_g)·s_g·w_g + b_g,   s_g = 1/√(σ²_g + ε)  (or 1: DetachedNorm's centering alone),
//     w_g = γ·r_g,   b_g = β + γ·d_g                       (r = 1, d = 0 but in Batch Renorm)
// with Batch Renorm's r_g = clip(√(σ²_g + ε)/σ, 1/r_max, r_max), d_g = clip((μ_g − μ)/σ, ±d_max),
// σ = √(running_var + ε) and μ = running_mean read before this step's update. Backward, with
// x̂ = (x − μ_g)·s_g:
//     dx = w_g·s_g·(dy − mean_g(dy) − x̂·mean_g(dy·x̂))   (project: the statistics in the gradient)
//     dx = w_g·s_g·dy                                     (DetachedNorm: the statistics constant)
//     dγ = Σ_g (r_g·Σ_g dy·x̂ + d_g·Σ_g dy),   dβ = Σ dy
// Running statistics (`update`): 0 none; 1 the whole batch's moments (Chan's merge of the groups'
// moments); 2 each group's moments in turn; 3 Batch Renorm's: μ ← μ + m·(mean_g μ_g − μ),
// σ ← σ + m·(mean_g √(σ²_g + ε) − σ), running_var = σ² − ε.
// One call does what a dozen small tensor operations did: on (256, 512) each cost µs, together
// more than BN's whole step.
// ---------------------------------------------------------------------------------------------

std::atomic<int64_t> group_node_calls{0};
std::atomic<int64_t> whiten_node_calls{0};

py::object& group_graph_backward() {
  static py::object* fn = new py::object();             // never destroyed: no Python at exit
  return *fn;
}

enum GroupUpdate : int64_t { kNoUpdate = 0, kWholeBatch = 1, kPerGroup = 2, kRenorm = 3 };

// write v (C doubles) into a 1-D running buffer of any floating dtype and stride
void write_running(at::Tensor t, const std::vector<double>& v) {
  const int64_t st = channel_stride(t), C = int64_t(v.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "bnlab_write_running", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) p[c * st] = scalar_t(v[c]);
  });
}

// body(g) for every group g: the groups in parallel when each is small (the passes inside then run
// serially — at::parallel_for does not nest — so one fork per pass per group is not paid G times),
// else one group after another, each pass parallel.
constexpr int64_t kSmallGroup = 1 << 16;          // values

template <typename F>
void for_groups(const Groups& gr, int64_t values, F&& body) {
  const int64_t G = int64_t(gr.size.size());
  if (G > 1 && at::get_num_threads() > 1 && values / G < kSmallGroup && !at::in_parallel_region()) {
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) body(g);
    });
  } else {
    for (int64_t g = 0; g < G; ++g) body(g);
  }
}

inline double clip(double v, double lo, double hi) { return v < lo ? lo : (v > hi ? hi : v); }   // NaN stays NaN

// The inputs a variant's node saved first, (x, γ, β) — γ, β undefined when absent — which of their
// gradients are wanted, and the gradients handed back in each tensor's dtype and shape.
struct NodeInputs {
  at::Tensor x, weight, bias;
  bool need_dx, need_dw, need_db;
  explicit NodeInputs(torch::autograd::AutogradContext* ctx) {
    const auto saved = ctx->get_saved_variables();
    x = saved[0], weight = saved[1], bias = saved[2];
    // needs_input_grad counts the tensor arguments that were given (x, then weight and bias if any)
    need_dx = ctx->needs_input_grad(0);
    need_dw = weight.defined() && ctx->needs_input_grad(1);
    need_db = bias.defined() && ctx->needs_input_grad(weight.defined() ? 2 : 1);
  }
  // what a node's forward saves first (then its own saved_data); gradients stay undefined when none flows
  static void save(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                   const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor())});
    ctx->set_materialize_grads(false);
  }
  // γ and β for a Python graph backward (None when absent)
  py::object py_weight() const { return weight.defined() ? py::cast(weight) : py::none(); }
  py::object py_bias() const { return bias.defined() ? py::cast(bias) : py::none(); }
  void hand_back(torch::autograd::variable_list& result, const at::Tensor& dx, const at::Tensor& dw,
                 const at::Tensor& db) const {
    if (need_dx && dx.defined()) result[0] = dx.scalar_type() == x.scalar_type() ? dx : dx.to(x.scalar_type());
    if (need_dw && dw.defined()) result[1] = dw.to(weight.scalar_type()).view(weight.sizes());
    if (need_db && db.defined()) result[2] = db.to(bias.scalar_type()).view(bias.sizes());
  }
};

struct GroupTrain : public torch::autograd::Function<GroupTrain> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                            std::vector<int64_t> sizes, double eps, bool scale, bool project, bool renorm,
                            double rmax, double dmax, const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_var, int64_t update, double momentum,
                            bool unbiased) {
    const Layout l = layout_of(x);
    const Groups gr = groups_of(l, sizes);
    const int64_t G = int64_t(sizes.size()), C = l.C, per_row = l.C * l.L;
    const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
    const bool has_rm = running_mean.has_value() && running_mean->defined();
    const bool has_rv = running_var.has_value() && running_var->defined();
    TORCH_CHECK(!(renorm || update == kRenorm) || (has_rm && has_rv), "Batch Renorm needs its running statistics");
    TORCH_CHECK(update == kNoUpdate || has_rm || has_rv, "no running statistics to update");
    const std::vector<double> w = has_w ? to_vec(*weight, C) : std::vector<double>();
    const std::vector<double> b = has_b ? to_vec(*bias, C) : std::vector<double>();
    // the per-group constants the backward needs, written where it reads them: one float64 tensor
    // with rows μ, s, γ·r (and r, d for Batch Renorm), each (G, C) (a list IValue would box every value)
    at::Tensor pack = at::empty({renorm ? 5 : 3, G * C}, at::TensorOptions().dtype(at::kDouble));
    double* const mean = pack.data_ptr<double>();
    double* const invstd = mean + G * C;
    double* const w_eff = mean + 2 * G * C;
    double* const r = renorm ? mean + 3 * G * C : nullptr;
    double* const d = renorm ? mean + 4 * G * C : nullptr;
    std::vector<double> var(G * C);
    at::Tensor y = empty_out(x, x.scalar_type());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_group_train", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      for_groups(gr, x.numel(), [&](int64_t g) {
        const Layout lg = slice_layout(l, gr.size[g]);
        const scalar_t* xg = xp + gr.start[g] * per_row;
        double* mg = mean + g * C;
        double* m2 = var.data() + g * C;                     // Σ(x − μ)², then σ² in place
        if (l.rows) stats_rows<scalar_t>(xg, lg, mg, m2);
        else stats_ncl<scalar_t>(xg, lg, mg, m2);
        infinite_means<scalar_t>(mg, xg, lg);
        variance_invstd(m2, double(lg.M), eps, m2, invstd + g * C, C);
        if (!scale) std::fill(invstd + g * C, invstd + (g + 1) * C, 1.0);
      });
    });
    std::vector<double> rm, rstd;                     // Batch Renorm's μ and σ before the update
    if (renorm || update == kRenorm) {
      rm = to_vec(*running_mean, C);
      rstd = to_vec(*running_var, C);
      for (double& s : rstd) s = std::sqrt(s + eps);
    }
    if (renorm) {
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0, i = g * C; c < C; ++c, ++i) {
          r[i] = clip(std::sqrt(var[i] + eps) / rstd[c], 1.0 / rmax, rmax);
          d[i] = clip((mean[i] - rm[c]) / rstd[c], -dmax, dmax);
        }
    }
    // the per-group affine: w_eff = γ·r, shift = β + γ·d
    std::vector<double> shift(G * C);
    for (int64_t g = 0; g < G; ++g)                   // (an i % C per value cost more than the pass)
      for (int64_t c = 0, i = g * C; c < C; ++c, ++i) {
        const double gamma = has_w ? w[c] : 1.0;
        w_eff[i] = renorm ? gamma * r[i] : gamma;
        shift[i] = (has_b ? b[c] : 0.0) + (renorm ? gamma * d[i] : 0.0);
      }
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_group_train_normalize", [&] {
      using acc_t = typename Acc<scalar_t>::type;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      for_groups(gr, x.numel(), [&](int64_t g) {
        thread_local std::vector<acc_t> alpha, beta;
        alpha.resize(C), beta.resize(C);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = g * C + c;
          const double a = w_eff[i] * invstd[i];
          alpha[c] = acc_t(a);
          beta[c] = acc_t(shift[i] - mean[i] * a);
        }
        affine<scalar_t>(xp + gr.start[g] * per_row, yp + gr.start[g] * per_row, slice_layout(l, gr.size[g]),
                         alpha, beta, kIdentity, 0.0, true);
      });
    });
    // running statistics
    if (update == kWholeBatch) {
      std::vector<double> wm(C, 0.0), wv(C, 0.0);
      const double total = double(l.M);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c) wm[c] += double(gr.size[g] * l.L) * mean[g * C + c];
      for (int64_t c = 0; c < C; ++c) wm[c] /= total;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < C; ++c) {
          const double dm = mean[g * C + c] - wm[c];
          wv[c] += double(gr.size[g] * l.L) * (var[g * C + c] + dm * dm);
        }
      for (int64_t c = 0; c < C; ++c) wv[c] /= total;
      update_running(running_mean, running_var, wm, wv, total, momentum, unbiased);
    } else if (update == kPerGroup) {
      for (int64_t g = 0; g < G; ++g)
        update_running(running_mean, running_var, std::vector<double>(mean + g * C, mean + (g + 1) * C),
                       std::vector<double>(var.begin() + g * C, var.begin() + (g + 1) * C),
                       double(gr.size[g] * l.L), momentum, unbiased);
    } else if (update == kRenorm) {
      std::vector<double> new_mean(C), new_var(C);
      for (int64_t c = 0; c < C; ++c) {
        double mu = 0.0, sd = 0.0;
        for (int64_t g = 0; g < G; ++g) {
          mu += mean[g * C + c];
          sd += std::sqrt(var[g * C + c] + eps);
        }
        mu /= double(G), sd /= double(G);
        new_mean[c] = rm[c] + momentum * (mu - rm[c]);
        const double s = rstd[c] + momentum * (sd - rstd[c]);
        new_var[c] = s * s - eps;
      }
      write_running(*running_mean, new_mean);
      write_running(*running_var, new_var);
    }
    NodeInputs::save(ctx, x, weight, bias);
    ctx->saved_data["sizes"] = sizes;
    ctx->saved_data["pack"] = pack;
    ctx->saved_data["renorm"] = renorm;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["project"] = project;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    const at::Tensor& dy_in = grads[0];
    const NodeInputs in(ctx);
    const at::Tensor &x = in.x, &weight = in.weight, &bias = in.bias;
    const bool need_dx = in.need_dx, need_dw = in.need_dw, need_db = in.need_db;
    torch::autograd::variable_list result(15);                 // one per forward argument
    if (!dy_in.defined()) return result;
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const at::Tensor pack = ctx->saved_data["pack"].toTensor();
    const bool project = ctx->saved_data["project"].toBool(), renorm = ctx->saved_data["renorm"].toBool();
    const Layout l = layout_of(x);
    const int64_t G = int64_t(sizes.size()), C = l.C;
    const double* mean = pack.data_ptr<double>();
    const double* invstd = mean + G * C;
    const double* w_eff = mean + 2 * G * C;
    const double* r = renorm ? mean + 3 * G * C : nullptr;
    const double* d = renorm ? mean + 4 * G * C : nullptr;
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {                          // a graph of the backward: the definition
      py::gil_scoped_acquire gil;
      auto row = [&](int64_t i) { return py::cast(pack[i].view({G, C})); };
      py::tuple out = group_graph_backward()(
          dy_in, x, in.py_weight(), in.py_bias(), sizes,
          ctx->saved_data["eps"].toDouble(), ctx->saved_data["scale"].toBool(), project, row(0), row(1),
          renorm ? row(3) : py::none(), renorm ? row(4) : py::none(), need_dx, need_dw, need_db);
      dx = tensor_or_undefined(out[0]), dw = tensor_or_undefined(out[1]), db = tensor_or_undefined(out[2]);
    } else {
      group_node_calls.fetch_add(1);
      const Groups gr = groups_of(l, sizes);
      const int64_t per_row = l.C * l.L;
      const at::Tensor dy = in_layout_of(dy_in, x);
      const bool own_copy = !dy.is_alias_of(dy_in) && dy.strides() == x.strides();
      const bool inplace = need_dx && dx_over_dy.load() && ((dy_dead_for(dy_in, x) && dy.is_same(dy_in)) || own_copy);
      const bool sums = project || need_dw || need_db;     // DetachedNorm without γ, β: dx = s·dy alone
      if (need_dx) dx = inplace ? dy : empty_out(x, x.scalar_type());
      std::vector<double> s1(G * C, 0.0), s2(G * C, 0.0);     // per group: Σdy, Σdy·(x − μ)
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_group_train_backward", [&] {
        using acc_t = typename Acc<scalar_t>::type;
        const scalar_t* dyp = dy.data_ptr<scalar_t>();
        const scalar_t* xp = x.data_ptr<scalar_t>();
        for_groups(gr, x.numel(), [&](int64_t g) {
          const Layout lg = slice_layout(l, gr.size[g]);
          const int64_t off = gr.start[g] * per_row;
          const double* mg = mean + g * C;
          double* s1g = s1.data() + g * C;
          double* s2g = s2.data() + g * C;
          if (sums) {
            if (l.rows) grad_sums_rows<scalar_t>(dyp + off, xp + off, mg, lg, s1g, s2g);
            else grad_sums_ncl<scalar_t>(dyp + off, xp + off, mg, lg, s1g, s2g);
          }
          if (!need_dx) return;
          const double inv_m = 1.0 / double(lg.M);
          thread_local std::vector<acc_t> k1, k2, k3;
          k1.resize(C), k2.resize(C), k3.resize(C);
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = g * C + c;
            const double k = invstd[i] * w_eff[i];
            const double kk = project ? invstd[i] * invstd[i] * s2g[c] * inv_m : 0.0;
            k1[c] = acc_t(k);
            k2[c] = acc_t(-k * kk);
            k3[c] = acc_t(project ? -k * s1g[c] * inv_m + k * kk * mg[c] : 0.0);
          }
          if (inplace) dx_pass_inplace<scalar_t>(dx.data_ptr<scalar_t>() + off, xp + off, lg, k1, k2, k3);
          else dx_pass<scalar_t>(dyp + off, xp + off, dx.data_ptr<scalar_t>() + off, lg, k1, k2, k3);
        });
      });
      std::vector<double> dgamma(C, 0.0), dbeta(C, 0.0);
      for (int64_t g = 0; g < G; ++g)                                  // in group order: deterministic
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = g * C + c;
          const double sxh = s2[i] * invstd[i];                          // Σ dy·x̂
          dgamma[c] += renorm ? r[i] * sxh + d[i] * s1[i] : sxh;
          dbeta[c] += s1[i];
        }
      if (need_dw) dw = vec(dgamma, at::kDouble);
      if (need_db) db = vec(dbeta, at::kDouble);
    }
    in.hand_back(result, dx, dw, db);
    return result;
  }
};

// Ghost BN, Batch Renorm and DetachedNorm's training step (see GroupTrain); the node records
// itself when a gradient is wanted.
at::Tensor group_train(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, std::vector<int64_t> sizes, double eps, bool scale,
                       bool project, bool renorm, double rmax, double dmax,
                       const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
                       int64_t update, double momentum, bool unbiased) {
  TORCH_CHECK(group_graph_backward() && !group_graph_backward().is_none(),
              "group_train: set_group_graph_backward was not called");
  TORCH_CHECK(update >= kNoUpdate && update <= kRenorm, "group_train: update must be 0, 1, 2 or 3");
  auto opt = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? t : c10::nullopt; };
  return GroupTrain::apply(x, opt(weight), opt(bias), std::move(sizes), eps, scale, project, renorm, rmax, dmax,
                           running_mean, running_var, update, momentum, unbiased);
}

// ---------------------------------------------------------------------------------------------
// ℓp normalization's training step as one C++ autograd node (variants/lp.py): lp_forward, the
// running statistics (μ ← μ + m·(μ_B − μ), d ← d + m·(d_B − d), the step counter), and
// lp_backward in the node — no small tensor operation around the kernels. A graph of the backward
// (create_graph=True) calls the registered Python function, which differentiates the definition.
// ---------------------------------------------------------------------------------------------

std::atomic<int64_t> lp_node_calls{0};

py::object& lp_graph_backward() {
  static py::object* fn = new py::object();             // never destroyed: no Python at exit
  return *fn;
}

struct LpTrain : public torch::autograd::Function<LpTrain> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, int64_t p,
                            int64_t groups, double eps, const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_scale,
                            const c10::optional<at::Tensor>& num_batches_tracked, double momentum) {
    const int64_t N = x.size(0), C = x.size(1), G = groups;
    const bool has_rm = running_mean.has_value() && running_mean->defined();
    const bool has_rs = running_scale.has_value() && running_scale->defined();
    TORCH_CHECK(!has_rm || running_layout_ok(*running_mean, C), "running_mean must be 1-D with ", C, " values");
    TORCH_CHECK(!has_rs || running_layout_ok(*running_scale, G), "running_scale must be 1-D with ", G, " values");
    LpStats st;
    at::Tensor y = lp_forward(x, p, groups, eps, weight, bias, &st);
    const std::vector<double> &mean = st.mean, &D = st.D;
    // the statistics in one float64 tensor, μ (C), n (N·G), ties (N·G), D (G): what the backward reads
    at::Tensor pack = at::empty({C + 2 * N * G + G}, at::TensorOptions().dtype(at::kDouble));
    double* pk = pack.data_ptr<double>();
    for (const std::vector<double>* v : {&st.mean, &st.n, &st.ties, &st.D}) pk = std::copy(v->begin(), v->end(), pk);
    if (has_rm) {
      std::vector<double> rm = to_vec(*running_mean, C);
      for (int64_t c = 0; c < C; ++c) rm[c] += momentum * (mean[c] - rm[c]);
      write_running(*running_mean, rm);
    }
    if (has_rs) {
      std::vector<double> rs = to_vec(*running_scale, G);
      for (int64_t g = 0; g < G; ++g) rs[g] += momentum * ((D[g] - eps) - rs[g]);
      write_running(*running_scale, rs);
    }
    if (num_batches_tracked.has_value() && num_batches_tracked->defined()) num_batches_tracked->add_(1);
    NodeInputs::save(ctx, x, weight, bias);
    ctx->saved_data["pack"] = pack;
    ctx->saved_data["p"] = p;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    const at::Tensor& dy_in = grads[0];
    const NodeInputs in(ctx);
    const at::Tensor &x = in.x, &weight = in.weight, &bias = in.bias;
    const bool need_dx = in.need_dx, need_dw = in.need_dw, need_db = in.need_db;
    torch::autograd::variable_list result(10);                 // one per forward argument
    if (!dy_in.defined()) return result;
    const int64_t p = ctx->saved_data["p"].toInt(), G = ctx->saved_data["groups"].toInt();
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {                          // a graph of the backward: the definition
      py::gil_scoped_acquire gil;
      py::tuple out = lp_graph_backward()(dy_in, x, in.py_weight(), in.py_bias(), p, G,
                                          ctx->saved_data["eps"].toDouble(), need_dx, need_dw, need_db);
      dx = tensor_or_undefined(out[0]), dw = tensor_or_undefined(out[1]), db = tensor_or_undefined(out[2]);
    } else {
      lp_node_calls.fetch_add(1);
      const int64_t N = x.size(0), C = x.size(1);
      const double* pk = ctx->saved_data["pack"].toTensor().data_ptr<double>();
      LpStats st;
      for (auto [v, len] : {std::pair{&st.mean, C}, {&st.n, N * G}, {&st.ties, N * G}, {&st.D, G}}) {
        v->assign(pk, pk + len);
        pk += len;
      }
      std::vector<double> dgamma, dbeta;
      at::Tensor out = lp_backward(dy_in, x, st, weight, p, G, &dgamma, &dbeta);
      if (need_dx) dx = out;
      if (need_dw) dw = vec(dgamma, at::kDouble);
      if (need_db) db = vec(dbeta, at::kDouble);
    }
    in.hand_back(result, dx, dw, db);
    return result;
  }
};

at::Tensor lp_train(const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                    int64_t p, int64_t groups, double eps, const c10::optional<at::Tensor>& running_mean,
                    const c10::optional<at::Tensor>& running_scale,
                    const c10::optional<at::Tensor>& num_batches_tracked, double momentum) {
  TORCH_CHECK(lp_graph_backward() && !lp_graph_backward().is_none(), "lp_train: set_lp_graph_backward was not called");
  auto opt = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? t : c10::nullopt; };
  return LpTrain::apply(x, opt(weight), opt(bias), p, groups, eps, running_mean, running_scale, num_batches_tracked,
                        momentum);
}

// functional.batch_norm's two commonest calls decided in one C++ call each: training with
// autograd (ending in batch_norm_train's node) and inference without it (forward_eval). Each
// returns None when any condition fails, and the Python path then runs (raising its errors with
// their messages). Why: right after a large kernel has flushed the caches, each small Python step
// of that path costs a few µs — its checks cost 35–96 µs a call on (64,64,28,28) and (4096,1024),
// 2–5% of torch.nn's whole training step (benchmarks/call_overhead.py; docs/performance.md,
// "Per-call overhead with cold caches").
// The conditions are the Python path's: kernels enabled (kernels.disabled() clears the flag),
// not traced (jit tracer, functorch transforms; torch.compile and tensor subclasses are tested in
// Python before the call), a graph to record in training and none in inference, a dense CPU
// tensor of a kernel dtype with ≥ 2 dims and values (training: more than one value per channel),
// and 1-D CPU per-channel tensors of C values.
std::atomic<int64_t> fast_forward_calls{0}, fast_eval_calls{0};
std::atomic<bool> fast_enabled{true};

inline bool per_channel_ok(const c10::optional<at::Tensor>& t, int64_t C) {
  return !t.has_value() || !t->defined() || channel_layout_ok(*t, C);
}

inline bool running_ok(const c10::optional<at::Tensor>& t, int64_t C) {
  return !t.has_value() || !t->defined() || running_layout_ok(*t, C);
}

inline bool requires_grad(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

// The conditions both calls share; `training` adds "more than one value per channel".
bool fast_call_ok(const at::Tensor& x, bool training, std::initializer_list<const c10::optional<at::Tensor>*> per_channel,
                  const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var) {
  if (!fast_enabled.load(std::memory_order_relaxed)) return false;
  // functorch transforms: the test torch._C._are_functorch_transforms_active makes
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  if (torch::jit::tracer::isTracing() || included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode))
    return false;
  const auto dtype = x.scalar_type();
  if (!x.device().is_cpu() || x.layout() != at::kStrided || x.is_nested() || at::isTensorSubclassLike(x) ||
      (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16))
    return false;
  const int64_t dim = x.dim();
  if (dim < 2 || x.size(1) == 0 || x.numel() == 0 || (training && x.numel() / x.size(1) <= 1)) return false;
  if (!(x.is_contiguous() || (dim == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
        (dim == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))))
    return false;
  const int64_t C = x.size(1);
  for (const auto* t : per_channel)
    if (!per_channel_ok(*t, C)) return false;
  return running_ok(running_mean, C) && running_ok(running_var, C);
}

py::object batch_norm_train_fast(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, double eps,
                                 const c10::optional<at::Tensor>& running_mean,
                                 const c10::optional<at::Tensor>& running_var, double momentum, bool unbiased) {
  if (!graph_backward() || graph_backward().is_none()) return py::none();
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || requires_grad(weight) || requires_grad(bias)))
    return py::none();                                           // nothing to record: not this call's case
  if (eps <= 0) return py::none();                              // the Python path raises (as torch.nn)
  if (!fast_call_ok(x, /*training=*/true, {&weight, &bias}, running_mean, running_var)) return py::none();
  fast_forward_calls.fetch_add(1);
  return py::cast(batch_norm_train(x, weight, bias, eps, running_mean, running_var, momentum, unbiased));
}

py::object batch_norm_eval_fast(const at::Tensor& x, const c10::optional<at::Tensor>& running_mean,
                                const c10::optional<at::Tensor>& running_var, const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& bias, double eps) {
  if (!running_mean.has_value() || !running_mean->defined() || !running_var.has_value() || !running_var->defined())
    return py::none();
  if (at::GradMode::is_enabled() && (x.requires_grad() || requires_grad(weight) || requires_grad(bias)))
    return py::none();                                           // a graph to record: not this call's case
  if (eps < 0) return py::none();                               // the Python path raises (as torch.nn)
  if (!fast_call_ok(x, /*training=*/false, {&weight, &bias}, running_mean, running_var)) return py::none();
  fast_eval_calls.fetch_add(1);
  return py::cast(forward_eval(x, *running_mean, *running_var, weight, bias, eps, 0, 0.0));
}

// ---------------------------------------------------------------------------------------------
// Single passes, for `bnlab bench passes` (where the time of a training step goes): each runs one
// pass of forward_train/backward_train exactly as they do (same layouts, threads, store rule),
// with fixed coefficients instead of the ones derived from the data.
// ---------------------------------------------------------------------------------------------

// pass: 0 statistics (reads x), 1 normalize (x → out), 2 gradient sums (dy, x), 3 dx (dy, x → out)
void bench_pass(int64_t pass, const at::Tensor& x, const at::Tensor& dy, at::Tensor& out) {
  const Layout l = layout_of(x);
  TORCH_CHECK(dy.strides() == x.strides() && out.strides() == x.strides() && dy.scalar_type() == x.scalar_type() &&
              out.scalar_type() == x.scalar_type(), "bench_pass: x, dy and out must share dtype and strides");
  std::vector<double> mean(l.C, 0.0), m2(l.C, 0.0), s1(l.C), s2(l.C);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bnlab_bench_pass", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const std::vector<acc_t> one(l.C, acc_t(1)), zero(l.C, acc_t(0));
    if (pass == 0) {
      if (l.rows) stats_rows<scalar_t>(xp, l, mean.data(), m2.data());
      else stats_ncl<scalar_t>(xp, l, mean.data(), m2.data());
    } else if (pass == 1) {
      affine<scalar_t>(xp, out.data_ptr<scalar_t>(), l, one, zero, kIdentity, 0.0, /*training=*/true);
    } else if (pass == 2) {
      if (l.rows) grad_sums_rows<scalar_t>(dy.data_ptr<scalar_t>(), xp, mean.data(), l, s1.data(), s2.data());
      else grad_sums_ncl<scalar_t>(dy.data_ptr<scalar_t>(), xp, mean.data(), l, s1.data(), s2.data());
    } else {
      dx_pass<scalar_t>(dy.data_ptr<scalar_t>(), xp, out.data_ptr<scalar_t>(), l, one, one, zero);
    }
  });
}

namespace {

// ---------------------------------------------------------------------------------------------
// Whitening's data-sized work, per group g of G consecutive channels, in the input's own layout:
//     cross:  P_g = Σ_samples (a − μ_a)_g (b − μ_b)_gᵀ    (g, G, G) in float64, and Σ a per channel
//     apply:  out_g = A_g·a_g + B_g·b_g + c_g              (the B·b term optional)
// Forward: Σ = cross(x, μ, x, μ)/m + εI, y = apply(x; diag(γ)W, β − diag(γ)W·μ). Backward:
// P = cross(dy, 0, x, μ) (with Σ dy = dβ), dx = apply(dy; (diag(γ)W)ᵀ, x; S, shift − S·μ).
// One read of each input per call and no centered copy of the data: torch's batched products
// needed x − μ materialized, a broadcast copy of β into the output and a copy of each
// transposed operand (three data-sized copies a step on (64, 64, 28, 28)).
// Sums: in float for float input over ≤ 256 samples (64 rows), each such sum added to float64; the
// inner loops are register tiles on 64-byte vectors (GCC vector extensions).
// ---------------------------------------------------------------------------------------------

// The (N, C, L) kernels walk a block's G rows side by side (row stride L): G interleaved streams are
// more than the hardware prefetcher follows. A block's rows are one contiguous stretch, and the
// blocks of a task are consecutive, so while one block is computed the next is prefetched into L2
// as one linear stream, a few lines a step (faster than a prefetch a fixed distance ahead in each
// row, which docs/variants.md lists as tried and rejected).
struct Ahead {
  const char* a = nullptr;                              // next block of a (and b), up to end
  const char* b = nullptr;
  const char* end = nullptr;
  int64_t per = 0;                                      // lines a step
  Ahead() = default;
  // bytes of a (and b) over the given number of steps
  Ahead(const void* na, const void* nb, int64_t bytes, int64_t steps)
      : a(static_cast<const char*>(na)), b(static_cast<const char*>(nb)), end(a + bytes),
        per((bytes + 64 * steps - 1) / (64 * steps)) {}
  inline void step() {
    for (int64_t q = 0; q < per && a < end; ++q, a += 64) {
      __builtin_prefetch(a, 0, 2);
      if (b) __builtin_prefetch(b, 0, 2), b += 64;
    }
  }
};

// a 64-byte vector to out: a plain store, or (NT, float) a streaming store to its aligned line — the
// whitening passes stream their output under the test BatchNorm's passes use (use_stream: the
// pass's inputs and output cannot all stay in the last-level cache)
template <bool NT, typename T>
inline void store_vec(T* p, typename V64<T>::v v) {
#ifdef BNLAB_STREAM
  if constexpr (NT && std::is_same<T, float>::value) {
    const float* h = reinterpret_cast<const float*>(&v);
    for (int q = 0; q < int(64 / sizeof(StreamVec::V)); ++q)
      StreamVec::stream(p + q * StreamVec::kWidth, StreamVec::load(h + q * StreamVec::kWidth));
    return;
  }
#endif
  *reinterpret_cast<typename V64<T>::v*>(p) = v;
}

// whether a whitening output pass streams: float, the build has streaming stores, every row of
// `stride` values starts on a line, and the pass's `touched` bytes exceed the threshold
template <typename T>
inline bool stream_out(const T* out, int64_t stride, int64_t touched) {
#ifdef BNLAB_STREAM
  return std::is_same<T, float>::value && (reinterpret_cast<uintptr_t>(out) & 63) == 0 &&
         (stride * int64_t(sizeof(T))) % 64 == 0 && use_stream(touched);
#else
  (void)out, (void)stride, (void)touched;
  return false;
#endif
}

inline void store_fence(bool nt) {
#ifdef BNLAB_STREAM
  if (nt) _mm_sfence();
#else
  (void)nt;
#endif
}

// apply, (N, C, L) layout, one (n, group) block: rows [i0, i0 + IB) of out = A·a (+ B·b) + c over
// the columns [k, k + V): IB accumulators in registers, each input row loaded once per column step
template <int IB, bool NT, typename T>
inline void apply_ncl_tile(const T* a, const T* A, const T* b, const T* B, const T* c, T* out, int64_t G,
                           int64_t L, int64_t i0, int64_t k) {
  using vec = typename V64<T>::v;
  vec acc[IB];
  for (int ii = 0; ii < IB; ++ii) acc[ii] = vec{} + c[i0 + ii];
  auto add = [&](const T* src, const T* M) {               // acc_ii += M's row i0 + ii times src
    for (int64_t j = 0; j < G; ++j) {
      const vec v = *reinterpret_cast<const vec*>(src + j * L + k);
      for (int ii = 0; ii < IB; ++ii) acc[ii] += M[(i0 + ii) * G + j] * v;
    }
  };
  add(a, A);
  if (b) add(b, B);
  for (int ii = 0; ii < IB; ++ii) store_vec<NT>(out + (i0 + ii) * L + k, acc[ii]);
}

template <bool NT, typename T>
void apply_ncl_block(const T* a, const T* A, const T* b, const T* B, const T* c, T* out, int64_t G, int64_t L,
                     const T* next_a, const T* next_b) {
  constexpr int V = V64<T>::n;
  const int64_t Lv = L - L % V;
  Ahead ahead = next_a ? Ahead(next_a, next_b, G * L * int64_t(sizeof(T)), std::max<int64_t>(1, Lv / V)) : Ahead();
  for (int64_t k = 0; k < Lv; k += V) {
    ahead.step();
    int64_t i0 = 0;
    for (; i0 + 16 <= G; i0 += 16) apply_ncl_tile<16, NT>(a, A, b, B, c, out, G, L, i0, k);
    for (; i0 + 4 <= G; i0 += 4) apply_ncl_tile<4, NT>(a, A, b, B, c, out, G, L, i0, k);
    for (; i0 < G; ++i0) apply_ncl_tile<1, NT>(a, A, b, B, c, out, G, L, i0, k);
  }
  for (int64_t k = Lv; k < L; ++k)                                  // the columns' tail
    for (int64_t i = 0; i < G; ++i) {
      T s = c[i];
      for (int64_t j = 0; j < G; ++j) s += A[i * G + j] * a[j * L + k];
      if (b)
        for (int64_t j = 0; j < G; ++j) s += B[i * G + j] * b[j * L + k];
      out[i * L + k] = s;
    }
}

// apply, rows layout, one group of G = JV·V contiguous values in each of RB rows: out_r = Aᵀ-columns
// times a_r; Aᵀ (G, G) row-major, so column j of A is the contiguous row j of Aᵀ
template <int RB, int JV, bool NT, typename T>
inline void apply_rows_tile(const T* a, const T* At, const T* b, const T* Bt, const T* c, T* out, int64_t C,
                            int64_t G) {
  using vec = typename V64<T>::v;
  constexpr int V = V64<T>::n;
  vec acc[RB][JV];
  for (int jv = 0; jv < JV; ++jv) {
    const vec cv = *reinterpret_cast<const vec*>(c + jv * V);
    for (int r = 0; r < RB; ++r) acc[r][jv] = cv;
  }
  auto add = [&](const T* src, const T* Mt) {              // acc_r += Mᵀ-columns times src_r
    for (int64_t j = 0; j < G; ++j) {
      vec col[JV];
      for (int jv = 0; jv < JV; ++jv) col[jv] = *reinterpret_cast<const vec*>(Mt + j * G + jv * V);
      for (int r = 0; r < RB; ++r) {
        const T x = src[r * C + j];
        for (int jv = 0; jv < JV; ++jv) acc[r][jv] += x * col[jv];
      }
    }
  };
  add(a, At);
  if (b) add(b, Bt);
  for (int r = 0; r < RB; ++r)
    for (int jv = 0; jv < JV; ++jv) store_vec<NT>(out + r * C + jv * V, acc[r][jv]);
}

// cross, (N, C, L) layout, one (n, group) block: rows [i0, i0 + IB) of a against rows [j0, j0 + JB)
// of b over the columns [k0, k1) (a multiple of V), IB·JB accumulators in registers
template <int IB, int JB, typename T>
inline void cross_ncl_tile(const T* a, const T* ma, const T* b, const T* mb, int64_t L, int64_t G, int64_t i0,
                           int64_t j0, int64_t k0, int64_t k1, double* P, Ahead& ahead) {
  using vec = typename V64<T>::v;
  constexpr int V = V64<T>::n;
  vec acc[IB][JB] = {};
  for (int64_t k = k0; k < k1; k += V) {
    vec av[IB], bv[JB];
    for (int ii = 0; ii < IB; ++ii) av[ii] = *reinterpret_cast<const vec*>(a + (i0 + ii) * L + k) - ma[i0 + ii];
    for (int jj = 0; jj < JB; ++jj) bv[jj] = *reinterpret_cast<const vec*>(b + (j0 + jj) * L + k) - mb[j0 + jj];
    ahead.step();
    for (int ii = 0; ii < IB; ++ii)
      for (int jj = 0; jj < JB; ++jj) acc[ii][jj] += av[ii] * bv[jj];
  }
  for (int ii = 0; ii < IB; ++ii)
    for (int jj = 0; jj < JB; ++jj) {
      T s = 0;
      for (int v = 0; v < V; ++v) s += acc[ii][jj][v];
      P[(i0 + ii) * G + j0 + jj] += double(s);
    }
}

template <typename T>
void cross_ncl_block(const T* a, const T* ma, const T* b, const T* mb, bool same, int64_t G, int64_t L,
                     double* P, double* sum_a, const T* next_a, const T* next_b) {
  constexpr int V = V64<T>::n;
  // each vector lane sums ≤ 256 values (float input) before the flush to float64
  const int64_t step = 256 * V;
  const int64_t Lv = L - L % V;
  const int64_t tiles_i = G / 4 + G % 4, tiles = same ? tiles_i * (tiles_i + 1) / 2 : tiles_i * tiles_i;
  Ahead ahead = next_a ? Ahead(next_a, same ? nullptr : next_b, G * L * int64_t(sizeof(T)),
                               std::max<int64_t>(1, tiles * (Lv / V)))
                       : Ahead();
  for (int64_t k0 = 0; k0 < Lv; k0 += step) {
    const int64_t k1 = std::min(Lv, k0 + step);
    int64_t i0 = 0;
    for (; i0 < G; i0 += (i0 + 4 <= G ? 4 : 1)) {
      const bool four_i = i0 + 4 <= G;
      for (int64_t j0 = same ? i0 : 0; j0 < G; j0 += (j0 + 4 <= G ? 4 : 1)) {
        const bool four_j = j0 + 4 <= G;
        if (four_i && four_j) cross_ncl_tile<4, 4>(a, ma, b, mb, L, G, i0, j0, k0, k1, P, ahead);
        else if (four_i) cross_ncl_tile<4, 1>(a, ma, b, mb, L, G, i0, j0, k0, k1, P, ahead);
        else if (four_j) cross_ncl_tile<1, 4>(a, ma, b, mb, L, G, i0, j0, k0, k1, P, ahead);
        else cross_ncl_tile<1, 1>(a, ma, b, mb, L, G, i0, j0, k0, k1, P, ahead);
      }
    }
  }
  for (int64_t i = 0; i < G; ++i) {                     // the columns' tail, and Σ a
    for (int64_t j = same ? i : 0; j < G; ++j) {
      double s = 0;
      for (int64_t k = Lv; k < L; ++k) s += double(a[i * L + k] - ma[i]) * double(b[j * L + k] - mb[j]);
      P[i * G + j] += s;
    }
    const T* ar = a + i * L;
    double s = 0;
    for (int64_t k0 = 0; k0 < L; k0 += step) {
      T t = 0;
      for (int64_t k = k0; k < std::min(L, k0 + step); ++k) t += ar[k];
      s += double(t);
    }
    sum_a[i] += s;
  }
}

// cross, rows layout, one group over rows [r0, r1): rows [i0, i0 + IB) of P += Σ a·(b − μ_b)ᵀ, G = JV·V
// columns; a is already centred (cross_rows centres a chunk once) or needs none (dy); a, b, mb
// start at the group's first channel
template <int IB, int JV, typename T>
inline void cross_rows_tile(const T* a, const T* b, const T* mb, int64_t C, int64_t G, int64_t r0, int64_t r1,
                            int64_t i0, double* P) {
  using vec = typename V64<T>::v;
  constexpr int V = V64<T>::n;
  vec acc[IB][JV] = {};
  vec mbv[JV];
  for (int jv = 0; jv < JV; ++jv) mbv[jv] = *reinterpret_cast<const vec*>(mb + jv * V);
  for (int64_t r = r0; r < r1; ++r) {
    vec bv[JV];
    for (int jv = 0; jv < JV; ++jv) bv[jv] = *reinterpret_cast<const vec*>(b + r * C + jv * V) - mbv[jv];
    for (int ii = 0; ii < IB; ++ii) {
      const T x = a[r * C + i0 + ii];
      for (int jv = 0; jv < JV; ++jv) acc[ii][jv] += x * bv[jv];
    }
  }
  for (int ii = 0; ii < IB; ++ii)
    for (int jv = 0; jv < JV; ++jv)
      for (int v = 0; v < V; ++v) P[(i0 + ii) * G + jv * V + v] += double(acc[ii][jv][v]);
}

template <int JV, typename T>
void cross_rows_group(const T* a, const T* b, const T* mb, int64_t C, int64_t G, int64_t r0, int64_t r1,
                      double* P) {
  constexpr int IB = 16 / JV;
  int64_t i0 = 0;
  for (; i0 + IB <= G; i0 += IB) cross_rows_tile<IB, JV>(a, b, mb, C, G, r0, r1, i0, P);
  for (; i0 < G; ++i0) cross_rows_tile<1, JV>(a, b, mb, C, G, r0, r1, i0, P);
}

// rows [r0, r1), every group: tiles of RB rows outer, the groups inner, so memory is read and
// written in order (a group at a time over the rows read each row's G-value slice at the row
// stride: 3–4× slower on channels_last (64, 64, 28, 28), where a row is only four groups)
template <int RB, int JV, bool NT, typename T>
void apply_rows_run(const T* a, const T* At, const T* b, const T* Bt, const T* c, T* out, int64_t C, int64_t G,
                    int64_t r0, int64_t r1) {
  auto groups = [&](auto rows, int64_t r) {
    for (int64_t o = 0; o < C; o += G)
      apply_rows_tile<decltype(rows)::value, JV, NT>(a + r * C + o, At + o * G, b ? b + r * C + o : nullptr,
                                                 b ? Bt + o * G : nullptr, c + o, out + r * C + o, C, G);
  };
  int64_t r = r0;
  for (; r + RB <= r1; r += RB) groups(std::integral_constant<int, RB>{}, r);
  for (; r < r1; ++r) groups(std::integral_constant<int, 1>{}, r);
}

// (N, C, L) contiguous: block (n, g) is G rows of L values (row stride L); tasks over the blocks,
// per-thread float64 sums
template <typename T>
void cross_ncl(const T* a, const double* mu_a, const T* b, const double* mu_b, bool same, const Layout& l,
               int64_t G, double* P, double* sum_a) {
  const int64_t N = l.N, C = l.C, L = l.L, g = C / G;
  const int nt = at::get_num_threads();
  std::vector<std::vector<double>> Pt(nt, std::vector<double>(g * G * G, 0.0)), St(nt, std::vector<double>(C, 0.0));
  std::vector<T> MA(C), MB(C);
  for (int64_t c = 0; c < C; ++c) MA[c] = mu_a ? T(mu_a[c]) : T(0), MB[c] = T(mu_b[c]);
  at::parallel_for(0, N * g, 1, [&](int64_t t0, int64_t t1) {
    const int tid = at::get_thread_num();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / g, gi = t % g;
      const int64_t off = (n * C + gi * G) * L;             // block t + 1 follows at off + G·L
      const bool more = t + 1 < t1;
      cross_ncl_block<T>(a + off, MA.data() + gi * G, b + off, MB.data() + gi * G, same, G, L,
                         Pt[tid].data() + gi * G * G, St[tid].data() + gi * G, more ? a + off + G * L : nullptr,
                         more ? b + off + G * L : nullptr);
    }
  });
  for (int t = 0; t < nt; ++t) {
    for (int64_t k = 0; k < g * G * G; ++k) P[k] += Pt[t][k];
    for (int64_t c = 0; c < C; ++c) sum_a[c] += St[t][c];
  }
}

// (M, C) rows: row r holds every group's G values contiguously at r·C + g·G; tasks over chunks of
// 64 rows (the float sums' length), per-thread float64 sums
template <typename T>
void cross_rows(const T* a, const double* mu_a, const T* b, const double* mu_b, bool same, const Layout& l,
                int64_t G, double* P, double* sum_a) {
  constexpr int V = V64<T>::n;
  const int64_t M = l.M, C = l.C, g = C / G, JV = G % V == 0 ? G / V : 0;
  const int nt = at::get_num_threads();
  std::vector<std::vector<double>> Pt(nt, std::vector<double>(g * G * G, 0.0)), St(nt, std::vector<double>(C, 0.0));
  std::vector<T> MA(C), MB(C), shift_b(C);
  for (int64_t c = 0; c < C; ++c) MA[c] = mu_a ? T(mu_a[c]) : T(0), MB[c] = T(mu_b[c]), shift_b[c] = MB[c] - MA[c];
  const int64_t R = 64;
  at::parallel_for(0, (M + R - 1) / R, 1, [&](int64_t c0, int64_t c1) {
    const int tid = at::get_thread_num();
    double* Pd = Pt[tid].data();
    double* Sd = St[tid].data();
    std::vector<T> s(C), cbuf;
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t r0 = ch * R, r1 = std::min(M, r0 + R);
      std::fill(s.begin(), s.end(), T(0));
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < C; ++c) s[c] += a[r * C + c];
      for (int64_t c = 0; c < C; ++c) Sd[c] += double(s[c]);
      // a centred once per chunk into an L1/L2 buffer (the same a − μ_a the tile would form per
      // value: a scalar subtract and broadcast each, a large share of the pass); the Gram
      // (same) reads both operands from it. Tiles then run on rows [0, n) of the two bases.
      const int64_t n = r1 - r0;
      const T* A0 = a + r0 * C;
      const T* B0 = b + r0 * C;
      const T* MBp = MB.data();
      if (mu_a != nullptr && JV >= 1 && JV <= 4) {
        cbuf.resize(n * C);
        for (int64_t r = 0; r < n; ++r)
          for (int64_t c = 0; c < C; ++c) cbuf[r * C + c] = A0[r * C + c] - MA[c];
        A0 = cbuf.data();
        if (same) B0 = cbuf.data(), MBp = shift_b.data();          // b − μ_b = (a − μ_a) − (μ_b − μ_a)
      }
      for (int64_t gi = 0; gi < g; ++gi) {
        const int64_t o = gi * G;
        double* Pg = Pd + gi * G * G;
        switch (JV) {
          case 1: cross_rows_group<1>(A0 + o, B0 + o, MBp + o, C, G, 0, n, Pg); break;
          case 2: cross_rows_group<2>(A0 + o, B0 + o, MBp + o, C, G, 0, n, Pg); break;
          case 3: cross_rows_group<3>(A0 + o, B0 + o, MBp + o, C, G, 0, n, Pg); break;
          case 4: cross_rows_group<4>(A0 + o, B0 + o, MBp + o, C, G, 0, n, Pg); break;
          default:                                         // other group sizes: plain loops
            for (int64_t i = 0; i < G; ++i)
              for (int64_t j = 0; j < G; ++j) {
                T t = 0;
                for (int64_t r = r0; r < r1; ++r) t += (a[r * C + o + i] - MA[o + i]) * (b[r * C + o + j] - MB[o + j]);
                Pg[i * G + j] += double(t);
              }
        }
      }
    }
  });
  for (int t = 0; t < nt; ++t) {
    for (int64_t k = 0; k < g * G * G; ++k) P[k] += Pt[t][k];
    for (int64_t c = 0; c < C; ++c) sum_a[c] += St[t][c];
  }
}

// out = A·a + B·b + c per group (A, B row-major (g, G, G), c (C), in T)
template <typename T>
void apply_ncl(const T* a, const T* A, const T* b, const T* B, const T* c, T* out, const Layout& l, int64_t G) {
  const int64_t N = l.N, C = l.C, L = l.L, g = C / G;
  const bool nt = stream_out(out, L, (b ? 3 : 2) * N * C * L * int64_t(sizeof(T)));
  at::parallel_for(0, N * g, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / g, gi = t % g;
      const int64_t off = (n * C + gi * G) * L;             // block t + 1 follows at off + G·L
      const bool more = t + 1 < t1;
      (nt ? apply_ncl_block<true, T> : apply_ncl_block<false, T>)(
          a + off, A + gi * G * G, b ? b + off : nullptr, b ? B + gi * G * G : nullptr, c + gi * G, out + off, G, L,
          more ? a + off + G * L : nullptr, more && b ? b + off + G * L : nullptr);
    }
    store_fence(nt);
  });
}

template <typename T>
void apply_rows(const T* a, const T* A, const T* b, const T* B, const T* c, T* out, const Layout& l, int64_t G) {
  constexpr int V = V64<T>::n;
  const int64_t M = l.M, C = l.C, g = C / G, JV = G % V == 0 ? G / V : 0;
  std::vector<T> At(g * G * G), Bt(b ? g * G * G : 0);          // transposed: column j of A contiguous
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t i = 0; i < G; ++i)
      for (int64_t j = 0; j < G; ++j) {
        At[gi * G * G + j * G + i] = A[gi * G * G + i * G + j];
        if (b) Bt[gi * G * G + j * G + i] = B[gi * G * G + i * G + j];
      }
  // blocks of 64 rows, one sweep over memory (apply_rows_run: row tiles outer, groups inner)
  const T* Ap = At.data();
  const T* Bp = b ? Bt.data() : nullptr;
  const bool nt = JV > 0 && stream_out(out, C, (b ? 3 : 2) * M * C * int64_t(sizeof(T)));
  at::parallel_for(0, (M + 63) / 64, 1, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * 64, r1 = std::min(M, b1 * 64);
    switch (JV * 2 + nt) {
      case 2: apply_rows_run<4, 1, false>(a, Ap, b, Bp, c, out, C, G, r0, r1); break;
      case 3: apply_rows_run<4, 1, true>(a, Ap, b, Bp, c, out, C, G, r0, r1); break;
      case 4: apply_rows_run<4, 2, false>(a, Ap, b, Bp, c, out, C, G, r0, r1); break;
      case 5: apply_rows_run<4, 2, true>(a, Ap, b, Bp, c, out, C, G, r0, r1); break;
      case 6: apply_rows_run<2, 3, false>(a, Ap, b, Bp, c, out, C, G, r0, r1); break;
      case 7: apply_rows_run<2, 3, true>(a, Ap, b, Bp, c, out, C, G, r0, r1); break;
      case 8: apply_rows_run<2, 4, false>(a, Ap, b, Bp, c, out, C, G, r0, r1); break;
      case 9: apply_rows_run<2, 4, true>(a, Ap, b, Bp, c, out, C, G, r0, r1); break;
      default:                                               // other group sizes: plain loops
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t gi = 0; gi < g; ++gi) {
            const int64_t o = gi * G;
            const T* Ag = Ap + gi * G * G;
            const T* Bg = b ? Bp + gi * G * G : nullptr;
            for (int64_t i = 0; i < G; ++i) {
              T s = c[o + i];
              for (int64_t j = 0; j < G; ++j) s += Ag[j * G + i] * a[r * C + o + j];
              if (b)
                for (int64_t j = 0; j < G; ++j) s += Bg[j * G + i] * b[r * C + o + j];
              out[r * C + o + i] = s;
            }
          }
    }
    store_fence(nt);
  });
}

// Σ (a − μ_a)(b − μ_b)ᵀ per group (+= into P, zeroed here) and Σ a (into S), b = a when same
template <typename T>
void cross_into(const T* a, const double* mu_a, const T* b, const double* mu_b, bool same, const Layout& l, int64_t G,
                double* P, double* S) {
  const int64_t g = l.C / G;
  std::fill(P, P + g * G * G, 0.0);
  std::fill(S, S + l.C, 0.0);
  if (l.rows) cross_rows<T>(a, mu_a, b, mu_b, same, l, G, P, S);
  else cross_ncl<T>(a, mu_a, b, mu_b, same, l, G, P, S);
  if (same)                                       // exactly symmetric: the upper triangle mirrored
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t i = 0; i < G; ++i)
        for (int64_t j = 0; j < i; ++j) P[gi * G * G + i * G + j] = P[gi * G * G + j * G + i];
}

// out = A·a + B·b + c per group, in a's layout
template <typename T>
void apply_into(const T* a, const T* A, const T* b, const T* B, const T* c, T* out, const Layout& l, int64_t G) {
  if (l.rows) apply_rows<T>(a, A, b, B, c, out, l, G);
  else apply_ncl<T>(a, A, b, B, c, out, l, G);
}

void check_group_input(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              what, ": float32 or float64 CPU tensor expected");
  TORCH_CHECK(t.sizes() == like.sizes() && t.strides() == like.strides() && t.scalar_type() == like.scalar_type(),
              what, ": every operand must have the first's shape, strides and dtype");
}

template <typename T>
std::vector<T> values_as(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.numel() == n, what, ": expected ", n, " values, got ", t.numel());
  const at::Tensor d = t.detach().to(at::kDouble).contiguous();
  return std::vector<T>(d.data_ptr<double>(), d.data_ptr<double>() + n);
}

// P (g, G, G) = Σ (a − μ_a)(b − μ_b)ᵀ per group and Σ a (C), both float64. b = None: the Gram of
// a (μ_b = μ_a); mu_a = None: a uncentered.
std::vector<at::Tensor> group_cross(const at::Tensor& a, const c10::optional<at::Tensor>& mu_a,
                                    const c10::optional<at::Tensor>& b, const at::Tensor& mu_b, int64_t G) {
  check_group_input(a, a, "group_cross");
  const bool same = !(b.has_value() && b->defined());
  if (!same) check_group_input(*b, a, "group_cross");
  const Layout l = layout_of(a);
  TORCH_CHECK(G >= 1 && l.C % G == 0, "group_cross: ", l.C, " channels do not split into groups of ", G);
  const int64_t g = l.C / G;
  const bool has_mu_a = mu_a.has_value() && mu_a->defined();
  TORCH_CHECK(!same || has_mu_a, "group_cross: the Gram of a needs a's mean");
  const std::vector<double> ma = has_mu_a ? values_as<double>(*mu_a, l.C, "group_cross") : std::vector<double>();
  const std::vector<double> mb = values_as<double>(mu_b, l.C, "group_cross");
  at::Tensor P = at::empty({g, G, G}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor S = at::empty({l.C}, at::TensorOptions().dtype(at::kDouble));
  const at::Tensor bb = same ? a : *b;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bnlab_group_cross", [&] {
    cross_into<scalar_t>(a.data_ptr<scalar_t>(), has_mu_a ? ma.data() : nullptr, bb.data_ptr<scalar_t>(), mb.data(),
                         same, l, G, P.data_ptr<double>(), S.data_ptr<double>());
  });
  return {P, S};
}

// out = A·a + B·b + c per group of G channels, in a's layout (A, B: (g, G, G); c: (C))
at::Tensor group_apply(const at::Tensor& a, const at::Tensor& A, const c10::optional<at::Tensor>& b,
                       const c10::optional<at::Tensor>& B, const at::Tensor& c) {
  check_group_input(a, a, "group_apply");
  const bool has_b = b.has_value() && b->defined();
  TORCH_CHECK(has_b == (B.has_value() && B->defined()), "group_apply: b and B go together");
  if (has_b) check_group_input(*b, a, "group_apply");
  const Layout l = layout_of(a);
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2) && A.size(0) * A.size(1) == l.C,
              "group_apply: A must be (groups, G, G) with groups·G = C");
  const int64_t G = A.size(1), g = A.size(0);
  at::Tensor out = empty_out(a, a.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bnlab_group_apply", [&] {
    const std::vector<scalar_t> Av = values_as<scalar_t>(A, g * G * G, "group_apply");
    const std::vector<scalar_t> Bv = has_b ? values_as<scalar_t>(*B, g * G * G, "group_apply") : std::vector<scalar_t>();
    const std::vector<scalar_t> cv = values_as<scalar_t>(c, l.C, "group_apply");
    apply_into<scalar_t>(a.data_ptr<scalar_t>(), Av.data(), has_b ? b->data_ptr<scalar_t>() : nullptr, Bv.data(),
                         cv.data(), out.data_ptr<scalar_t>(), l, G);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Whitening's training step around its small matrix function W(Σ) (variants/whitening.py's
// _WhitenFn), the glue on (g, G, G) matrices and C-vectors done here, beside the passes:
//     whiten_moments:   μ, Σ = P/m + εI (P the centred Gram, float64 sums), whether Σ is finite
//     whiten_apply:     y = diag(γ)W·x + (β − diag(γ)W·μ)
//     whiten_grad_sums: P' = Σ dy (x − μ)ᵀ → dW = diag(γ)P', dγ = rowsum(W ∘ P'), dβ = Σ dy
//     whiten_grad_x:    dx = (diag(γ)W)ᵀdy + S·x + (−(diag(γ)W)ᵀ dβ/m − S·μ), S = (dΣ + dΣᵀ)/m
// Each small step was a torch operation of a few µs (~40 a step) against kernels of tens of µs on
// (256, 512); the arithmetic and its rounding follow the Python it replaces (results in x's dtype,
// the sums in float64).
// ---------------------------------------------------------------------------------------------

// x's per-channel values of an optional (C) tensor as T (γ, β; 1 or 0 when absent)
template <typename T>
std::vector<T> channel_values(const c10::optional<at::Tensor>& t, int64_t C, T absent, const char* what) {
  if (!(t.has_value() && t->defined())) return std::vector<T>(C, absent);
  const std::vector<double> v = values_as<double>(*t, C, what);
  return std::vector<T>(v.begin(), v.end());
}

// (μ (C), Σ (g, G, G), finite), both in x's dtype. One pass shifted by K — the running mean, or 0 —
// P_K = Σ (x − K)(x − K)ᵀ and Σ x, then μ = Σx/m, P = P_K − m·(μ − K)(μ − K)ᵀ; its rounding error
// grows with m·(μ − K)² against the channel's own M2 = P_K,ii − m·(μ − K)_i², so the shift is kept
// only where m·(μ − K)_i² ≤ M2_i in every channel (error ≤ 2× exact centring's); otherwise — a
// shifted batch, no running mean and a mean beyond the spread, NaN — a second pass centres on μ.
std::tuple<at::Tensor, at::Tensor, bool> whiten_moments(const at::Tensor& x, const c10::optional<at::Tensor>& shift,
                                                        int64_t G, double eps) {
  check_group_input(x, x, "whiten_moments");
  const Layout l = layout_of(x);
  TORCH_CHECK(G >= 1 && l.C % G == 0, "whiten_moments: ", l.C, " channels do not split into groups of ", G);
  const int64_t C = l.C, g = C / G, GG = G * G;
  const double m = double(l.M);
  const std::vector<double> K = shift.has_value() && shift->defined() ? values_as<double>(*shift, C, "whiten_moments")
                                                                       : std::vector<double>(C, 0.0);
  std::vector<double> P(g * GG), S(C), mean(C), d(C);
  at::Tensor mean_t = at::empty({C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor sigma = at::empty({g, G, G}, x.options().memory_format(at::MemoryFormat::Contiguous));
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_whiten_moments", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    cross_into<T>(xp, K.data(), xp, K.data(), true, l, G, P.data(), S.data());
    bool close = true;                              // the shift kept: m·(μ − K)_i² ≤ M2_i in every channel
    for (int64_t c = 0; c < C; ++c) {
      d[c] = S[c] / m - K[c];
      const double md2 = m * d[c] * d[c], m2 = P[(c / G) * GG + (c % G) * (G + 1)] - md2;
      close = close && md2 <= m2;
    }
    T* mp = mean_t.data_ptr<T>();
    if (close) {
      for (int64_t c = 0; c < C; ++c) mp[c] = T(K[c] + d[c]);
      for (int64_t gi = 0; gi < g; ++gi)
        for (int64_t i = 0; i < G; ++i)
          for (int64_t j = 0; j < G; ++j) P[gi * GG + i * G + j] -= m * (d[gi * G + i] * d[gi * G + j]);   // symmetric
    } else {                                        // centred on μ (in x's dtype), a second pass
      for (int64_t c = 0; c < C; ++c) mp[c] = T(S[c] / m), mean[c] = double(mp[c]);
      cross_into<T>(xp, mean.data(), xp, mean.data(), true, l, G, P.data(), S.data());
    }
    T* sp = sigma.data_ptr<T>();
    for (int64_t i = 0; i < g * GG; ++i) sp[i] = T(P[i] / m);
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t i = 0; i < G; ++i) sp[gi * GG + i * (G + 1)] += T(eps);
    for (int64_t i = 0; i < g * GG; ++i) finite = finite && std::isfinite(double(sp[i]));
  });
  return {mean_t, sigma, finite};
}

inline void check_whitening_matrix(const at::Tensor& W, const Layout& l, const char* what) {
  TORCH_CHECK(W.dim() == 3 && W.size(1) == W.size(2) && W.size(0) * W.size(1) == l.C, what,
              ": W must be (groups, G, G) with groups·G = C");
}

// A_g = diag(γ_g)·W_g in T, and optionally the transpose
template <typename T>
std::vector<T> scaled_rows(const at::Tensor& W, const std::vector<T>& gamma, int64_t g, int64_t G, bool transpose,
                           const char* what) {
  const std::vector<double> w = values_as<double>(W, g * G * G, what);
  std::vector<T> A(g * G * G);
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t i = 0; i < G; ++i)
      for (int64_t j = 0; j < G; ++j) {
        const T v = T(w[gi * G * G + i * G + j]) * gamma[gi * G + i];
        A[gi * G * G + (transpose ? j * G + i : i * G + j)] = v;
      }
  return A;
}

// y = A·x + (β − A·μ), A = diag(γ)·W
at::Tensor whiten_apply(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, const at::Tensor& mean) {
  check_group_input(x, x, "whiten_apply");
  const Layout l = layout_of(x);
  check_whitening_matrix(W, l, "whiten_apply");
  const int64_t C = l.C, g = W.size(0), G = W.size(1);
  at::Tensor y = empty_out(x, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_whiten_apply", [&] {
    using T = scalar_t;
    const std::vector<T> A = scaled_rows<T>(W, channel_values<T>(weight, C, T(1), "whiten_apply"), g, G, false,
                                            "whiten_apply");
    const std::vector<T> beta = channel_values<T>(bias, C, T(0), "whiten_apply");
    const std::vector<double> mu = values_as<double>(mean, C, "whiten_apply");
    std::vector<T> c(C);
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t i = 0; i < G; ++i) {
        double s = 0;
        for (int64_t j = 0; j < G; ++j) s += double(A[gi * G * G + i * G + j]) * mu[gi * G + j];
        c[gi * G + i] = T(-s) + beta[gi * G + i];
      }
    apply_into<T>(x.data_ptr<T>(), A.data(), nullptr, nullptr, c.data(), y.data_ptr<T>(), l, G);
  });
  return y;
}

// (dW = diag(γ)·P', dγ (undefined without γ), dβ), P' = Σ dy (x − μ)ᵀ per group, all in x's dtype
std::vector<at::Tensor> whiten_grad_sums(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& mean,
                                         const at::Tensor& W, const c10::optional<at::Tensor>& weight) {
  check_group_input(x, x, "whiten_grad_sums");
  const at::Tensor dy = in_layout_of(dy_in, x);
  const Layout l = layout_of(x);
  check_whitening_matrix(W, l, "whiten_grad_sums");
  const int64_t C = l.C, g = W.size(0), G = W.size(1), GG = G * G;
  const bool has_w = weight.has_value() && weight->defined();
  at::Tensor dW = at::empty({g, G, G}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor db = at::empty({C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dw = has_w ? at::empty({C}, x.options().memory_format(at::MemoryFormat::Contiguous)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_whiten_grad_sums", [&] {
    using T = scalar_t;
    const std::vector<double> mu = values_as<double>(mean, C, "whiten_grad_sums");
    const std::vector<double> w = values_as<double>(W, g * GG, "whiten_grad_sums");
    const std::vector<T> gamma = channel_values<T>(weight, C, T(1), "whiten_grad_sums");
    std::vector<double> P(g * GG), S(C);
    cross_into<T>(dy.data_ptr<T>(), nullptr, x.data_ptr<T>(), mu.data(), false, l, G, P.data(), S.data());
    T* dWp = dW.data_ptr<T>();
    T* dbp = db.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) dbp[c] = T(S[c]);
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t i = 0; i < G; ++i) {
        T row = 0;                                    // Σ_j W_ij P'_ij in T, as (W * P).sum(-1)
        for (int64_t j = 0; j < G; ++j) {
          const int64_t k = gi * GG + i * G + j;
          const T p = T(P[k]);
          dWp[k] = p * gamma[gi * G + i];
          row += T(w[k]) * p;
        }
        if (has_w) dw.data_ptr<T>()[gi * G + i] = row;
      }
  });
  return {dW, dw, db};
}

// dx = Aᵀ·dy + S·x + (−Aᵀ·dβ/m − S·μ), A = diag(γ)·W, S = (dΣ + dΣᵀ)/m
at::Tensor whiten_grad_x(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& W,
                         const c10::optional<at::Tensor>& weight, const at::Tensor& dsigma, const at::Tensor& dbeta) {
  check_group_input(x, x, "whiten_grad_x");
  const at::Tensor dy = in_layout_of(dy_in, x);
  const Layout l = layout_of(x);
  check_whitening_matrix(W, l, "whiten_grad_x");
  TORCH_CHECK(dsigma.sizes() == W.sizes(), "whiten_grad_x: dsigma must have W's shape");
  const int64_t C = l.C, g = W.size(0), G = W.size(1), GG = G * G;
  const double m = double(l.M);
  at::Tensor dx = empty_out(x, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_whiten_grad_x", [&] {
    using T = scalar_t;
    const std::vector<T> At = scaled_rows<T>(W, channel_values<T>(weight, C, T(1), "whiten_grad_x"), g, G, true,
                                             "whiten_grad_x");
    const std::vector<double> ds = values_as<double>(dsigma, g * GG, "whiten_grad_x");
    const std::vector<double> mu = values_as<double>(mean, C, "whiten_grad_x");
    const std::vector<double> dbv = values_as<double>(dbeta, C, "whiten_grad_x");
    std::vector<T> S(g * GG), c(C);
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t i = 0; i < G; ++i)
        for (int64_t j = 0; j < G; ++j) {
          const int64_t o = gi * GG;
          S[o + i * G + j] = (T(ds[o + i * G + j]) + T(ds[o + j * G + i])) / T(m);
        }
    for (int64_t gi = 0; gi < g; ++gi)
      for (int64_t i = 0; i < G; ++i) {
        double s = 0;
        for (int64_t j = 0; j < G; ++j) {
          const int64_t o = gi * GG + i * G + j;
          s += double(At[o]) * (dbv[gi * G + j] / m) + double(S[o]) * mu[gi * G + j];
        }
        c[gi * G + i] = T(-s);
      }
    apply_into<T>(dy.data_ptr<T>(), At.data(), x.data_ptr<T>(), S.data(), c.data(), dx.data_ptr<T>(), l, G);
  });
  return dx;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// IterNorm's small-matrix work (Huang et al. 2019), per group of a (g, G, G) batch of covariances:
//     forward:   Σ_N = Σ / tr Σ,  P_0 = I,  P_k = 1.5·P_{k−1} − 0.5·P_{k−1}³·Σ_N (k = 1…T),  W = P_T / √tr Σ
//     backward:  with Ḡ = ∂ℓ/∂P_k and P = P_{k−1}, going k = T … 1,
//                ∂ℓ/∂P_{k−1} = 1.5·Ḡ − 0.5·(Ḡ·(P²Σ_N)ᵀ + Pᵀ·Ḡ·(PΣ_N)ᵀ + (P²)ᵀ·Ḡ·Σ_Nᵀ),  ∂ℓ/∂Σ_N += −0.5·(P³)ᵀ·Ḡ
//                then ∂ℓ/∂Σ = ∂ℓ/∂Σ_N / tr + (∂ℓ/∂tr − ⟨∂ℓ/∂Σ_N, Σ⟩ / tr²)·I, ∂ℓ/∂tr = −½·tr^(−3/2)·⟨∂ℓ/∂W, P_T⟩
// — the vector-Jacobian product autograd takes through the same iterations (no symmetry is
// assumed), in one call instead of ~15 batched products and their ~30 backward nodes, each a
// Python-level op on matrices of a few hundred values. variants/whitening.py's iternorm_matrix
// is the definition; the tests hold the two equal.
// ---------------------------------------------------------------------------------------------
namespace {

// C = op(A)·B for G × G row-major matrices, op(A) = A or Aᵀ; the inner loop runs along B's rows.
// For G a multiple of a 64-byte vector's lanes (up to 4 vectors), RB rows of C are held in
// registers at once — G broadcast multiply-adds of B's rows each, RB·NV ≥ 6 independent
// accumulators so that the multiply-adds' latency is hidden (one row alone is a chain of G).
template <typename T, int NV, int RB>
inline void mm_rows(const T* __restrict A, bool transA, const T* __restrict B, T* __restrict C) {
  using vec = typename V64<T>::v;
  constexpr int L = V64<T>::n, G = NV * L;
  static_assert(G % RB == 0, "row blocks must tile the matrix");
  for (int i0 = 0; i0 < G; i0 += RB) {
    vec acc[RB][NV] = {};
    for (int k = 0; k < G; ++k) {
      vec b[NV];
      for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const vec*>(B + k * G + v * L);
      for (int r = 0; r < RB; ++r) {
        const T a = transA ? A[k * G + i0 + r] : A[(i0 + r) * G + k];
        for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < NV; ++v) *reinterpret_cast<vec*>(C + (i0 + r) * G + v * L) = acc[r][v];
  }
}

template <typename T>
inline void mm(const T* __restrict A, bool transA, const T* __restrict B, T* __restrict C, int64_t G) {
  constexpr int L = V64<T>::n;
  switch (G) {
    case L: return mm_rows<T, 1, 8>(A, transA, B, C);
    case 2 * L: return mm_rows<T, 2, 4>(A, transA, B, C);
    case 3 * L: return mm_rows<T, 3, 2>(A, transA, B, C);
    case 4 * L: return mm_rows<T, 4, 2>(A, transA, B, C);
    default: break;
  }
  for (int64_t i = 0; i < G; ++i) {
    T* __restrict c = C + i * G;
    for (int64_t j = 0; j < G; ++j) c[j] = 0;
    for (int64_t k = 0; k < G; ++k) {
      const T a = transA ? A[k * G + i] : A[i * G + k];
      const T* __restrict b = B + k * G;
      for (int64_t j = 0; j < G; ++j) c[j] += a * b[j];
    }
  }
}

template <typename T>
inline void transpose_into(const T* __restrict A, T* __restrict At, int64_t G) {
  for (int64_t i = 0; i < G; ++i)
    for (int64_t j = 0; j < G; ++j) At[j * G + i] = A[i * G + j];
}

}  // namespace

// (W, P) with W (g, G, G) and P (3, T + 1, g, G, G): P[0] the iterates P_0 … P_T, P[1] and P[2]
// the powers the iterations formed, P_0² … P_{T−1}² and P_0³ … P_{T−1}³ (their last slot zero) —
// kept for the backward, which would otherwise form them again (the same products, so the same values)
std::vector<at::Tensor> newton_inv_sqrt(const at::Tensor& sigma_in, int64_t T) {
  TORCH_CHECK(sigma_in.device().is_cpu(), "newton_inv_sqrt: a CPU tensor");
  TORCH_CHECK(sigma_in.dim() == 3 && sigma_in.size(1) == sigma_in.size(2), "newton_inv_sqrt: sigma must be (g, G, G)");
  TORCH_CHECK(sigma_in.scalar_type() == at::kFloat || sigma_in.scalar_type() == at::kDouble,
              "newton_inv_sqrt: float32 or float64");
  TORCH_CHECK(T >= 1, "newton_inv_sqrt: T ≥ 1");
  const at::Tensor sigma = sigma_in.contiguous();
  const int64_t g = sigma.size(0), G = sigma.size(1), GG = G * G;
  at::Tensor W = at::empty_like(sigma), P = at::zeros({3, T + 1, g, G, G}, sigma.options());
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "bnlab_newton", [&] {
    const scalar_t* S = sigma.data_ptr<scalar_t>();
    scalar_t* Wp = W.data_ptr<scalar_t>();
    scalar_t* Pp = P.data_ptr<scalar_t>();
    at::parallel_for(0, g, 1, [&](int64_t g0, int64_t g1) {
      std::vector<scalar_t> buf(GG);
      scalar_t* SN = buf.data();
      for (int64_t b = g0; b < g1; ++b) {
        const scalar_t* s = S + b * GG;
        scalar_t tr = 0;
        for (int64_t i = 0; i < G; ++i) tr += s[i * G + i];
        for (int64_t i = 0; i < GG; ++i) SN[i] = s[i] / tr;
        scalar_t* P0 = Pp + b * GG;                                        // P_0 = I
        for (int64_t i = 0; i < GG; ++i) P0[i] = 0;
        for (int64_t i = 0; i < G; ++i) P0[i * G + i] = 1;
        for (int64_t k = 1; k <= T; ++k) {
          const scalar_t* Pk = Pp + ((k - 1) * g + b) * GG;
          scalar_t* Pn = Pp + (k * g + b) * GG;
          scalar_t* P2 = Pp + ((T + k) * g + b) * GG;
          scalar_t* P3 = Pp + ((2 * T + 1 + k) * g + b) * GG;
          mm(Pk, false, Pk, P2, G);                                          // P²
          mm(P2, false, Pk, P3, G);                                          // P³
          mm(P3, false, SN, Pn, G);                                          // P³·Σ_N
          for (int64_t i = 0; i < GG; ++i) Pn[i] = scalar_t(1.5) * Pk[i] - scalar_t(0.5) * Pn[i];
        }
        const scalar_t* PT = Pp + (T * g + b) * GG;
        const scalar_t r = scalar_t(1) / std::sqrt(tr);
        for (int64_t i = 0; i < GG; ++i) Wp[b * GG + i] = PT[i] * r;
      }
    });
  });
  return {W, P};
}

// ∂ℓ/∂Σ from ∂ℓ/∂W, Σ and newton_inv_sqrt's P (the iterates and their squares and cubes)
at::Tensor newton_inv_sqrt_backward(const at::Tensor& dW_in, const at::Tensor& sigma_in, const at::Tensor& P) {
  TORCH_CHECK(dW_in.device().is_cpu() && sigma_in.device().is_cpu() && P.device().is_cpu(),
              "newton_inv_sqrt_backward: CPU tensors");
  const at::Tensor dW = dW_in.contiguous().to(sigma_in.scalar_type()), sigma = sigma_in.contiguous();
  TORCH_CHECK(P.dim() == 5 && P.size(0) == 3 && P.size(1) >= 2 && P.size(2) == sigma.size(0) &&
                  P.size(3) == sigma.size(1) && P.size(4) == sigma.size(1) && P.is_contiguous() &&
                  dW.sizes() == sigma.sizes() && P.scalar_type() == sigma.scalar_type(),
              "newton_inv_sqrt_backward: dW, sigma (g, G, G) and P (3, T + 1, g, G, G) do not match");
  const int64_t T = P.size(1) - 1, g = sigma.size(0), G = sigma.size(1), GG = G * G;
  at::Tensor dS = at::empty_like(sigma);
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "bnlab_newton_backward", [&] {
    const scalar_t* S = sigma.data_ptr<scalar_t>();
    const scalar_t* D = dW.data_ptr<scalar_t>();
    const scalar_t* Pp = P.data_ptr<scalar_t>();
    scalar_t* out = dS.data_ptr<scalar_t>();
    at::parallel_for(0, g, 1, [&](int64_t g0, int64_t g1) {
      std::vector<scalar_t> buf(9 * GG);
      scalar_t *SN = buf.data(), *SNt = SN + GG, *Gb = SNt + GG, *Gn = Gb + GG, *dSN = Gn + GG, *X = dSN + GG,
               *Xt = X + GG, *Y = Xt + GG, *Z = Y + GG;
      for (int64_t b = g0; b < g1; ++b) {
        const scalar_t* s = S + b * GG;
        const scalar_t* d = D + b * GG;
        scalar_t tr = 0;
        for (int64_t i = 0; i < G; ++i) tr += s[i * G + i];
        for (int64_t i = 0; i < GG; ++i) SN[i] = s[i] / tr;
        transpose_into(SN, SNt, G);
        const scalar_t r = scalar_t(1) / std::sqrt(tr);
        const scalar_t* PT = Pp + (T * g + b) * GG;
        scalar_t dW_PT = 0;
        for (int64_t i = 0; i < GG; ++i) {
          Gb[i] = d[i] * r;                                                  // ∂ℓ/∂P_T
          dW_PT += d[i] * PT[i];
          dSN[i] = 0;
        }
        const scalar_t dtr = scalar_t(-0.5) * r * r * r * dW_PT;
        for (int64_t k = T; k >= 1; --k) {
          const scalar_t* Pk = Pp + ((k - 1) * g + b) * GG;                 // P = P_{k−1}
          const scalar_t* P2 = Pp + ((T + k) * g + b) * GG;                 // P², as the forward formed it
          const scalar_t* P3 = Pp + ((2 * T + 1 + k) * g + b) * GG;         // P³
          // Ḡ·(P²Σ_N)ᵀ
          mm(P2, false, SN, X, G);
          transpose_into(X, Xt, G);
          mm(Gb, false, Xt, Gn, G);
          // + Pᵀ·Ḡ·(PΣ_N)ᵀ
          mm(Pk, true, Gb, Y, G);
          mm(Pk, false, SN, X, G);
          transpose_into(X, Xt, G);
          mm(Y, false, Xt, Z, G);
          for (int64_t i = 0; i < GG; ++i) Gn[i] += Z[i];
          // + (P²)ᵀ·Ḡ·Σ_Nᵀ
          mm(P2, true, Gb, Y, G);
          mm(Y, false, SNt, Z, G);
          for (int64_t i = 0; i < GG; ++i) Gn[i] += Z[i];
          // ∂ℓ/∂Σ_N −= ½·(P³)ᵀ·Ḡ
          mm(P3, true, Gb, Z, G);
          for (int64_t i = 0; i < GG; ++i) dSN[i] -= scalar_t(0.5) * Z[i];
          for (int64_t i = 0; i < GG; ++i) Gb[i] = scalar_t(1.5) * Gb[i] - scalar_t(0.5) * Gn[i];
        }
        scalar_t dSN_S = 0;
        for (int64_t i = 0; i < GG; ++i) dSN_S += dSN[i] * s[i];
        const scalar_t diag = dtr - dSN_S / (tr * tr);
        scalar_t* o = out + b * GG;
        for (int64_t i = 0; i < GG; ++i) o[i] = dSN[i] / tr;
        for (int64_t i = 0; i < G; ++i) o[i * G + i] += diag;
      }
    });
  });
  return dS;
}

// ---------------------------------------------------------------------------------------------
// ZCA: W = Σ^(−½) = D·diag(1/s)·Dᵀ with Σ = D·diag(λ)·Dᵀ, s = √λ, per (G, G) group, and its
// vector-Jacobian product
//   dΣ = D·((Dᵀ·sym(dW)·D) ∘ K)·Dᵀ,   K_ij = −1/(s_i s_j (s_i + s_j))
// (the Daleckii–Krein divided difference of λ^(−½); whitening.py's _InvSqrtm is the readable
// definition, on LAPACK's eigh). The eigendecomposition is cyclic Jacobi (Golub & Van Loan,
// Matrix Computations §8.5; Rutishauser's rotation), in float64, eight matrices at once, one per
// lane of a 64-byte vector: for 32 groups of 16, torch's batched eigh alone costs more than a
// (256, 512) BatchNorm step, Jacobi and its backward about half that (`bnlab bench variants`' floor
// table). Each matrix is first scaled by a power of two to a largest entry
// near 1 (exact), so the sweeps' sums of squares hold at any scale of Σ. Sweeps run until every
// lane's off-diagonal mass is ≤ 1e-30 of its diagonal's (quadratic convergence: 6–9 sweeps for
// G = 16), at most 60 (NaN never converges; it comes out NaN) — eigenvalues accurate to about
// float64's rounding of ‖Σ‖, as LAPACK's.
// ---------------------------------------------------------------------------------------------
typedef double lanes8 __attribute__((vector_size(64)));   // one entry of eight matrices

inline lanes8 sqrt8(lanes8 v) {
  lanes8 r;
  for (int l = 0; l < 8; ++l) r[l] = std::sqrt(v[l]);
  return r;
}

// A (G·G, symmetric; the upper triangle is read and kept) → its eigenvalues on the diagonal;
// V (G·G) ← the eigenvectors, in columns
void jacobi8(lanes8* A, lanes8* V, int64_t G) {
  for (int64_t i = 0; i < G * G; ++i) V[i] = lanes8{};
  for (int64_t i = 0; i < G; ++i) V[i * G + i] = lanes8{} + 1.0;
  for (int sweep = 0; sweep < 60; ++sweep) {
    lanes8 off = {}, dia = {};
    for (int64_t p = 0; p < G; ++p) {
      dia += A[p * G + p] * A[p * G + p];
      for (int64_t q = p + 1; q < G; ++q) off += A[p * G + q] * A[p * G + q];
    }
    bool done = true;
    for (int l = 0; l < 8; ++l) done = done && off[l] <= 1e-30 * dia[l];
    if (done) return;
    for (int64_t p = 0; p + 1 < G; ++p)
      for (int64_t q = p + 1; q < G; ++q) {
        const lanes8 apq = A[p * G + q], app = A[p * G + p], aqq = A[q * G + q];
        // t = tan φ of the rotation that zeroes a_pq: θ = (a_qq − a_pp)/(2a_pq),
        // t = sgn θ/(|θ| + √(θ² + 1)); 0 where a_pq = 0 (θ = ±∞ gives 0 too)
        const lanes8 th = (aqq - app) / (2.0 * apq);
        const lanes8 ath = th < 0 ? -th : th;
        const lanes8 tl = 1.0 / (ath + sqrt8(th * th + 1.0));
        const lanes8 t = apq == 0 ? lanes8{} : (th < 0 ? -tl : tl);
        const lanes8 c = 1.0 / sqrt8(t * t + 1.0), s = t * c;
        // (a_rp, a_rq) ← (c·a_rp − s·a_rq, s·a_rp + c·a_rq) for r ≠ p, q, each entry at its
        // upper-triangle place: (r, p), (r, q) for r < p; (p, r), (r, q) between; (p, r), (q, r) after
        auto rotate = [&](lanes8& rp, lanes8& rq) {
          const lanes8 x = rp, y = rq;
          rp = c * x - s * y;
          rq = s * x + c * y;
        };
        for (int64_t r = 0; r < p; ++r) rotate(A[r * G + p], A[r * G + q]);
        for (int64_t r = p + 1; r < q; ++r) rotate(A[p * G + r], A[r * G + q]);
        for (int64_t r = q + 1; r < G; ++r) rotate(A[p * G + r], A[q * G + r]);
        A[p * G + p] = app - t * apq;
        A[q * G + q] = aqq + t * apq;
        A[p * G + q] = lanes8{};
        for (int64_t r = 0; r < G; ++r) rotate(V[r * G + p], V[r * G + q]);
      }
  }
}

// (W in Σ's dtype, D float64 (g, G, G), s float64 (g, G)): what zca_inv_sqrt_backward needs
std::vector<at::Tensor> zca_inv_sqrt(const at::Tensor& sigma_in) {
  TORCH_CHECK(sigma_in.device().is_cpu(), "zca_inv_sqrt: a CPU tensor");
  TORCH_CHECK(sigma_in.dim() == 3 && sigma_in.size(1) == sigma_in.size(2), "zca_inv_sqrt: sigma must be (g, G, G)");
  TORCH_CHECK(sigma_in.scalar_type() == at::kFloat || sigma_in.scalar_type() == at::kDouble,
              "zca_inv_sqrt: float32 or float64");
  const at::Tensor sigma = sigma_in.contiguous();
  const int64_t g = sigma.size(0), G = sigma.size(1), GG = G * G;
  at::Tensor W = at::empty_like(sigma);
  at::Tensor Dm = at::empty({g, G, G}, sigma.options().dtype(at::kDouble));
  at::Tensor s = at::empty({g, G}, sigma.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "bnlab_zca", [&] {
    using T = scalar_t;
    const T* S = sigma.data_ptr<T>();
    T* Wp = W.data_ptr<T>();
    double* Dp = Dm.data_ptr<double>();
    double* sp = s.data_ptr<double>();
    const double tiny = double(std::numeric_limits<T>::min());        // λ clamped as the definition does
    at::parallel_for(0, (g + 7) / 8, 1, [&](int64_t b0, int64_t b1) {
      std::vector<lanes8, Aligned64<lanes8>> A(GG), V(GG), Vs(GG), sv(G);
      for (int64_t b = b0; b < b1; ++b) {                                 // matrices 8b … 8b + 7
        for (int64_t i = 0; i < GG; ++i)                                  // lanes past g: the identity
          for (int l = 0; l < 8; ++l)
            A[i][l] = b * 8 + l < g ? double(S[(b * 8 + l) * GG + i]) : (i % (G + 1) == 0 ? 1.0 : 0.0);
        // each matrix scaled by a power of two (exact) to a largest entry in [½, 1): the sweeps'
        // sums of squares then neither overflow nor underflow at any scale of Σ
        lanes8 up = {};
        for (int l = 0; l < 8; ++l) {
          double m = 0;
          for (int64_t i = 0; i < GG; ++i) m = std::max(m, std::fabs(A[i][l]));
          int e = 0;
          if (m > 0 && std::isfinite(m)) std::frexp(m, &e);
          up[l] = std::ldexp(1.0, e);
          for (int64_t i = 0; i < GG; ++i) A[i][l] = std::ldexp(A[i][l], -e);
        }
        jacobi8(A.data(), V.data(), G);
        for (int64_t k = 0; k < G; ++k) {                                 // s = √max(λ, tiny)
          const lanes8 lam = A[k * G + k] * up;
          sv[k] = sqrt8(lam < tiny ? lanes8{} + tiny : lam);
        }
        for (int64_t r = 0; r < G; ++r)                                   // D·diag(1/s)
          for (int64_t k = 0; k < G; ++k) Vs[r * G + k] = V[r * G + k] / sv[k];
        for (int64_t r = 0; r < G; ++r)                                   // W = D·diag(1/s)·Dᵀ, symmetric
          for (int64_t q = r; q < G; ++q) {
            lanes8 w = {};
            for (int64_t k = 0; k < G; ++k) w += V[r * G + k] * Vs[q * G + k];
            A[r * G + q] = A[q * G + r] = w;
          }
        for (int l = 0; l < 8 && b * 8 + l < g; ++l) {
          const int64_t m = b * 8 + l;
          for (int64_t i = 0; i < GG; ++i) Wp[m * GG + i] = T(A[i][l]), Dp[m * GG + i] = V[i][l];
          for (int64_t i = 0; i < G; ++i) sp[m * G + i] = sv[i][l];
        }
      }
    });
  });
  return {W, Dm, s};
}

// ∂ℓ/∂Σ from ∂ℓ/∂W and zca_inv_sqrt's D, s: D·((Dᵀ·sym(dW)·D) ∘ K)·Dᵀ, in dW's dtype
at::Tensor zca_inv_sqrt_backward(const at::Tensor& dW_in, const at::Tensor& D_in, const at::Tensor& s_in) {
  TORCH_CHECK(dW_in.device().is_cpu() && D_in.device().is_cpu() && s_in.device().is_cpu(),
              "zca_inv_sqrt_backward: CPU tensors");
  TORCH_CHECK(dW_in.scalar_type() == at::kFloat || dW_in.scalar_type() == at::kDouble,
              "zca_inv_sqrt_backward: dW float32 or float64");
  TORCH_CHECK(dW_in.dim() == 3 && D_in.sizes() == dW_in.sizes() && s_in.dim() == 2 && s_in.size(0) == dW_in.size(0) &&
              s_in.size(1) == dW_in.size(1) && dW_in.size(1) == dW_in.size(2) &&
              D_in.scalar_type() == at::kDouble && s_in.scalar_type() == at::kDouble,
              "zca_inv_sqrt_backward: dW (g, G, G), D (g, G, G) and s (g, G) float64 from zca_inv_sqrt do not match");
  const at::Tensor dW = dW_in.contiguous(), Dm = D_in.contiguous(), s = s_in.contiguous();
  const int64_t g = dW.size(0), G = dW.size(1), GG = G * G;
  at::Tensor dS = at::empty_like(dW);
  AT_DISPATCH_FLOATING_TYPES(dW.scalar_type(), "bnlab_zca_backward", [&] {
    using T = scalar_t;
    const T* dWp = dW.data_ptr<T>();
    const double* Dp = Dm.data_ptr<double>();
    const double* sp = s.data_ptr<double>();
    T* out = dS.data_ptr<T>();
    at::parallel_for(0, g, 1, [&](int64_t g0, int64_t g1) {
      std::vector<double> sym(GG), X(GG), M(GG);
      for (int64_t b = g0; b < g1; ++b) {
        const T* d = dWp + b * GG;
        const double* Db = Dp + b * GG;
        const double* sb = sp + b * G;
        for (int64_t i = 0; i < G; ++i)
          for (int64_t j = 0; j < G; ++j) sym[i * G + j] = 0.5 * (double(d[i * G + j]) + double(d[j * G + i]));
        mm(sym.data(), false, Db, X.data(), G);                              // sym(dW)·D
        mm(Db, true, X.data(), M.data(), G);                                  // Dᵀ·sym(dW)·D
        for (int64_t i = 0; i < G; ++i)
          for (int64_t j = 0; j < G; ++j) M[i * G + j] *= -1.0 / (sb[i] * sb[j] * (sb[i] + sb[j]));
        mm(Db, false, M.data(), X.data(), G);                                 // D·(M ∘ K)
        for (int64_t i = 0; i < G; ++i)                                       // ·Dᵀ
          for (int64_t j = 0; j < G; ++j) {
            double v = 0;
            for (int64_t k = 0; k < G; ++k) v += X[i * G + k] * Db[j * G + k];
            out[b * GG + i * G + j] = T(v);
          }
      }
    });
  });
  return dS;
}

// ---------------------------------------------------------------------------------------------
// Whitening's training step as one C++ autograd node: ZCA with groups of ≤ 16 (zca_inv_sqrt),
// IterNorm (newton_inv_sqrt) and PCA (W = diag(λ^(−½))·Dᵀ from torch's eigh, its vector-Jacobian
// product by autograd through the same ATen operations whitening.py's definition runs, so the
// same values). The same calls as
// whitening.py's _WhitenFn — whiten_moments, the matrix function, whiten_apply; backward
// whiten_grad_sums, the function's vector-Jacobian product, whiten_grad_x — and the running
// statistics' update, without a Python frame in between: on (256, 512) the Python around the
// kernels cost about as much as BatchNorm's whole step. Under create_graph the backward is the
// definition's graph (whitening.py's _graph_backward). A NaN/Inf input raises before any running
// statistic changes (the message starts "whitening: NaN/Inf", which whitening.py turns into its
// NonFiniteError).
// ---------------------------------------------------------------------------------------------
enum WhitenKind : int64_t { kZca = 0, kIterNorm = 1, kPca = 2 };

// PCA's W = diag(max(λ, tiny)^(−½))·Dᵀ with (λ, D) = eigh(Σ), recorded on a leaf copy of Σ: (W, the leaf)
std::pair<at::Tensor, at::Tensor> pca_matrix(const at::Tensor& sigma) {
  at::AutoGradMode on(true);
  at::Tensor leaf = sigma.detach().requires_grad_(true);
  auto [lam, D] = at::linalg_eigh(leaf);
  const double tiny = sigma.scalar_type() == at::kFloat ? double(std::numeric_limits<float>::min())
                                                        : std::numeric_limits<double>::min();
  return {at::matmul(at::diag_embed(lam.clamp_min(tiny).rsqrt()), D.transpose(-1, -2)), leaf};
}

py::object& whiten_graph_backward() {
  static py::object* fn = new py::object();             // never destroyed: no Python at exit
  return *fn;
}

struct WhitenTrain : public torch::autograd::Function<WhitenTrain> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                            int64_t G, double eps, int64_t kind, int64_t T, const c10::optional<at::Tensor>& shift,
                            const c10::optional<at::Tensor>& running_mean,
                            const c10::optional<at::Tensor>& running_whitening,
                            const c10::optional<at::Tensor>& num_batches_tracked, double momentum) {
    TORCH_CHECK(kind == kZca || kind == kIterNorm || kind == kPca, "whiten_train: kind 0 (ZCA), 1 (IterNorm) or 2 (PCA)");
    auto [mean, sigma, finite] = whiten_moments(x, shift, G, eps);                 // C ; g, G, G
    TORCH_CHECK(finite, "whitening: NaN/Inf in the input — its covariance has no eigendecomposition or inverse "
                        "square root; no statistics were updated");
    std::vector<at::Tensor> fn;
    if (kind == kPca) {
      auto [Wg, leaf] = pca_matrix(sigma);
      fn = {Wg.detach(), Wg, leaf};                              // W; W with its graph, Σ's leaf
    } else {
      fn = kind == kZca ? zca_inv_sqrt(sigma) : newton_inv_sqrt(sigma, T);
    }
    const at::Tensor W = fn[0];
    at::Tensor y = whiten_apply(x, W, weight, bias, mean);                          // diag(γ)W·(x − μ) + β
    const bool update = running_mean.has_value() && running_mean->defined();
    if (update) {
      TORCH_CHECK(running_whitening.has_value() && running_whitening->defined() &&
                      running_whitening->sizes() == W.sizes() && running_mean->numel() == x.size(1),
                  "whiten_train: running_whitening must be (groups, G, G) and running_mean C values");
      if (num_batches_tracked.has_value() && num_batches_tracked->defined()) num_batches_tracked->add_(1);
      running_mean->lerp_(mean.to(running_mean->scalar_type()), momentum);
      running_whitening->lerp_(W.to(running_whitening->scalar_type()), momentum);
    }
    NodeInputs::save(ctx, x, weight, bias);
    ctx->saved_data["mean"] = mean;
    ctx->saved_data["W"] = W;
    // ZCA: D, s; IterNorm: Σ, the iterates; PCA: W's graph and Σ's leaf
    ctx->saved_data["a"] = kind == kIterNorm ? sigma : fn[1];
    ctx->saved_data["b"] = kind == kIterNorm ? fn[1] : fn[2];
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["G"] = G;
    ctx->saved_data["T"] = T;
    ctx->saved_data["eps"] = eps;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list& grads) {
    const at::Tensor& dy = grads[0];
    const NodeInputs in(ctx);
    torch::autograd::variable_list result(12);                 // one per forward argument
    if (!dy.defined()) return result;
    const int64_t kind = ctx->saved_data["kind"].toInt();
    at::Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {                          // a graph of the backward: the definition
      py::gil_scoped_acquire gil;
      py::tuple out = whiten_graph_backward()(dy, in.x, in.py_weight(), in.py_bias(), ctx->saved_data["G"].toInt(),
                                              ctx->saved_data["eps"].toDouble(), kind, ctx->saved_data["T"].toInt(),
                                              in.need_dx, in.need_dw, in.need_db);
      dx = tensor_or_undefined(out[0]), dw = tensor_or_undefined(out[1]), db = tensor_or_undefined(out[2]);
    } else {
      whiten_node_calls.fetch_add(1);
      const at::Tensor mean = ctx->saved_data["mean"].toTensor(), W = ctx->saved_data["W"].toTensor();
      const at::Tensor a = ctx->saved_data["a"].toTensor(), b = ctx->saved_data["b"].toTensor();
      const c10::optional<at::Tensor> weight = in.weight.defined() ? c10::optional<at::Tensor>(in.weight) : c10::nullopt;
      std::vector<at::Tensor> sums = whiten_grad_sums(dy, in.x, mean, W, weight);   // dW, dγ, dβ
      if (in.need_dx) {
        at::Tensor dS;
        if (kind == kZca) dS = zca_inv_sqrt_backward(sums[0], a, b);
        else if (kind == kIterNorm) dS = newton_inv_sqrt_backward(sums[0], a, b);
        else dS = torch::autograd::grad({a}, {b}, {sums[0]}, /*retain_graph=*/true)[0];   // kept: backward may run again
        dx = whiten_grad_x(dy, in.x, mean, W, weight, dS, sums[2]);
      }
      dw = sums[1], db = sums[2];
    }
    in.hand_back(result, dx, dw, db);
    return result;
  }
};

at::Tensor whiten_train(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, int64_t G, double eps, int64_t kind, int64_t T,
                        const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& running_mean,
                        const c10::optional<at::Tensor>& running_whitening,
                        const c10::optional<at::Tensor>& num_batches_tracked, double momentum) {
  TORCH_CHECK(whiten_graph_backward() && !whiten_graph_backward().is_none(),
              "whiten_train: set_whiten_graph_backward was not called");
  auto opt = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? t : c10::nullopt; };
  return WhitenTrain::apply(x, opt(weight), opt(bias), G, eps, kind, T, opt(shift), opt(running_mean),
                            opt(running_whitening), opt(num_batches_tracked), momentum);
}

// ---------------------------------------------------------------------------------------------
// Noisy BN's noise (Santurkar et al. 2018, App. Alg. 1), drawn inside the pass that applies it:
//     per channel c and step t:   μ_c = (2u − 1)·n_μ,   σ_c = 1 + u'·(n_σ − 1)
//     per element e:              s = σ_c + r_σ·z,       m = μ_c − r_μ + 2r_μ·v,   y = s·a + m
// with u, u', v uniform on [0, 1) and z standard normal. Every number is a function of (seed,
// step, logical element index) — a counter-based generator, Philox4x32-10 (Salmon et al. 2011,
// the generator of cuRAND and of torch's CUDA streams) — so the noise does not depend on the
// layout, the thread count or the order of the work, and nothing is stored between steps. One
// Philox block per pair of elements e = 2j, 2j+1 (counter (j, step)): its first two words give
// z for both by Box–Muller (r = √(−2 ln u₁), θ = 2π·u₂: z = r·cos θ, r·sin θ), the last two
// give v. The channel values come from the counter (c, 2³²−1, step). bnlab/variants/noisy.py
// has the same definition in torch ops; the tests hold the two equal.
// ---------------------------------------------------------------------------------------------
namespace {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

inline void philox_scalar(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(c[0]) * kPhiloxM0, p1 = uint64_t(c[2]) * kPhiloxM1;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0, n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
    c[1] = uint32_t(p1);
    c[3] = uint32_t(p0);
    c[0] = n0;
    c[2] = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));

// (hi, lo) 32-bit halves of a·M in every lane
inline void mulhilo(u32x16 a, uint32_t M, u32x16& hi, u32x16& lo) {
#if defined(__AVX512F__)
  const __m512i Mv = _mm512_set1_epi32(int(M)), av = (__m512i)a;
  const __m512i even = _mm512_mul_epu32(av, Mv), odd = _mm512_mul_epu32(_mm512_srli_epi64(av, 32), Mv);
  hi = (u32x16)_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
#else
  for (int i = 0; i < 16; ++i) hi[i] = uint32_t((uint64_t(a[i]) * M) >> 32);
#endif
  lo = a * M;
}

// ln u for u in (0, 1]: u = 2^e·m with m in [√½, √2), ln m = 2·atanh((m − 1)/(m + 1)) to t⁹
// (|t| ≤ 0.172: truncation below 4e-10)
inline f32x16 log16(f32x16 u) {
  const i32x16 b = (i32x16)u;
  i32x16 e = ((b >> 23) & 0xff) - 127;
  f32x16 m = (f32x16)((b & 0x7fffff) | 0x3f800000);              // [1, 2)
  const i32x16 big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const f32x16 t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
  const f32x16 p = 2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
  return __builtin_convertvector(e, f32x16) * 0.693147180559945f + p;
}

inline f32x16 sqrt16(f32x16 x) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_sqrt_ps((__m512)x);
#else
  for (int i = 0; i < 16; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}

constexpr float k2m24 = 1.0f / 16777216.0f;

inline void store64(float* p, f32x16 x) { std::memcpy(p, &x, sizeof x); }                         // 2⁻²⁴

// z (standard normal) and v (uniform [0, 1)) for the 64 logical elements 2·j0 … 2·j0 + 63,
// in order: the pair j's elements are z[2(j − j0)], z[2(j − j0) + 1]. Two blocks of 16 counters
// go through the rounds side by side: one block's rounds are a dependency chain of multiplies.
inline void draw64(uint64_t j0, uint64_t step, uint32_t k0, uint32_t k1, float* __restrict z, float* __restrict v) {
  const u32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  u32x16 c0[2], c1[2], c2[2], c3[2];
  for (int b = 0; b < 2; ++b) {
    const uint64_t first = j0 + 16 * b;
    c0[b] = lane + uint32_t(first);
    c1[b] = (u32x16){} + uint32_t(first >> 32);
    if (((first + 15) >> 32) != (first >> 32)) c1[b] += (u32x16)(c0[b] < uint32_t(first)) & 1u;  // carry
    c2[b] = (u32x16){} + uint32_t(step);
    c3[b] = (u32x16){} + uint32_t(step >> 32);
  }
  for (int r = 0; r < 10; ++r) {
    for (int b = 0; b < 2; ++b) {
      u32x16 h0, l0, h1, l1;
      mulhilo(c0[b], kPhiloxM0, h0, l0);
      mulhilo(c2[b], kPhiloxM1, h1, l1);
      c0[b] = h1 ^ c1[b] ^ k0;
      c1[b] = l1;
      c2[b] = h0 ^ c3[b] ^ k1;
      c3[b] = l0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int b = 0; b < 2; ++b) {
    // u₁ = (w₀ >> 8 + 1)·2⁻²⁴ in (0, 1]; θ = 2π·(w₁ >> 8)·2⁻²⁴ reduced exactly in integers to
    // q quarter turns plus φ in [−π/4, π/4]; sin φ, cos φ by Taylor to φ⁹, φ⁸ (error < 3e-8)
    const f32x16 u1 = __builtin_convertvector((i32x16)((c0[b] >> 8) + 1), f32x16) * k2m24;
    const f32x16 r = sqrt16(-2.0f * log16(u1));
    const i32x16 w = (i32x16)(c1[b] >> 8), q = (w + (1 << 21)) >> 22;
    const f32x16 phi = __builtin_convertvector(w - (q << 22), f32x16) * float(1.5707963267948966 / 4194304.0);
    const f32x16 p2 = phi * phi;
    const f32x16 sn = phi * (1.0f + p2 * (-1.0f / 6 + p2 * (1.0f / 120 + p2 * (-1.0f / 5040 + p2 * (1.0f / 362880)))));
    const f32x16 cs = 1.0f + p2 * (-0.5f + p2 * (1.0f / 24 + p2 * (-1.0f / 720 + p2 * (1.0f / 40320))));
    const i32x16 odd = (q & 1) != 0, neg = (q & 2) != 0;
    f32x16 zc = odd ? -sn : cs, zs = odd ? cs : sn;                  // rotate by q quarter turns
    zc = neg ? -zc : zc;
    zs = neg ? -zs : zs;
    zc *= r;
    zs *= r;
    const f32x16 va = __builtin_convertvector((i32x16)(c2[b] >> 8), f32x16) * k2m24;
    const f32x16 vb = __builtin_convertvector((i32x16)(c3[b] >> 8), f32x16) * k2m24;
    float* zo = z + 32 * b;
    float* vo = v + 32 * b;
    // interleave the pairs' two elements
    store64(zo, __builtin_shufflevector(zc, zs, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
    store64(zo + 16, __builtin_shufflevector(zc, zs, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
    store64(vo, __builtin_shufflevector(va, vb, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
    store64(vo + 16, __builtin_shufflevector(va, vb, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
  }
}

constexpr int64_t kNoiseBlock = 2048;                               // logical elements drawn at a time (even)

struct NoiseParams {
  uint32_t k0, k1;
  uint64_t step;
  float r_sigma, two_r_mu;
  std::vector<float> sigma, mu0;                                     // σ_c, μ_c − r_μ
};

NoiseParams noise_params(uint64_t seed, uint64_t step, int64_t C, double n_mu, double n_sigma, double r_mu,
                         double r_sigma) {
  NoiseParams p;
  p.k0 = uint32_t(seed);
  p.k1 = uint32_t(seed >> 32);
  p.step = step;
  p.r_sigma = float(r_sigma);
  p.two_r_mu = float(2 * r_mu);
  p.sigma.resize(C);
  p.mu0.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    uint32_t w[4] = {uint32_t(c), 0xFFFFFFFFu, uint32_t(step), uint32_t(step >> 32)};
    philox_scalar(w, p.k0, p.k1);
    const double u = (w[0] >> 8) * double(k2m24), u2 = (w[1] >> 8) * double(k2m24);
    p.mu0[c] = float((2 * u - 1) * n_mu - r_mu);
    p.sigma[c] = float(1 + u2 * (n_sigma - 1));
  }
  return p;
}

// z, v for the logical elements [e0, e1) into z[0 … e1 − e0), v[…]
inline void draw_range(const NoiseParams& p, int64_t e0, int64_t e1, float* z, float* v) {
  alignas(64) float zb[64], vb[64];
  int64_t e = e0;
  while (e < e1) {
    const int64_t a = e & ~int64_t(63);                             // 64-aligned window holding e
    const int64_t take = std::min<int64_t>(a + 64, e1) - e;
    if (e == a && take == 64) {
      draw64(uint64_t(a) >> 1, p.step, p.k0, p.k1, z + (e - e0), v + (e - e0));
    } else {
      draw64(uint64_t(a) >> 1, p.step, p.k0, p.k1, zb, vb);
      std::memcpy(z + (e - e0), zb + (e - a), take * sizeof(float));
      std::memcpy(v + (e - e0), vb + (e - a), take * sizeof(float));
    }
    e += take;
  }
}

// y = s·a + m over a run of n values, s = σ + r_σ·z, m = μ₀ + 2r_μ·v; σ, μ₀ arrays indexed like
// the run (per_value: 2-D rows, channels_last rows) or one value for all of it (an NCL row)
template <typename scalar_t, bool per_value>
inline void noise_run(const scalar_t* __restrict a, scalar_t* __restrict y, float* __restrict s_out, int64_t n,
                      const float* __restrict z, const float* __restrict v, const float* __restrict sig,
                      const float* __restrict mu0, float rs, float rm2) {
  if (s_out) {
    for (int64_t i = 0; i < n; ++i) {
      const float s = (per_value ? sig[i] : sig[0]) + rs * z[i], m = (per_value ? mu0[i] : mu0[0]) + rm2 * v[i];
      y[i] = scalar_t(s) * a[i] + scalar_t(m);
      s_out[i] = s;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float s = (per_value ? sig[i] : sig[0]) + rs * z[i], m = (per_value ? mu0[i] : mu0[0]) + rm2 * v[i];
      y[i] = scalar_t(s) * a[i] + scalar_t(m);
    }
  }
}

std::vector<at::Tensor> nonstationary_noise(const at::Tensor& a, int64_t seed, int64_t step, double n_mu, double n_sigma,
                                            double r_mu, double r_sigma, bool save_scale) {
  TORCH_CHECK(a.device().is_cpu(), "nonstationary_noise: a CPU tensor");
  TORCH_CHECK(a.dim() >= 2, "nonstationary_noise: input must be (N, C, ...)");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "nonstationary_noise: float32 or float64 input");
  const Layout l = layout_of(a);
  const int64_t C = l.C, L = l.L, N = l.N;
  const NoiseParams p = noise_params(uint64_t(seed), uint64_t(step), C, n_mu, n_sigma, r_mu, r_sigma);
  at::Tensor y = empty_out(a, a.scalar_type());
  at::Tensor s = save_scale ? empty_out(a, at::kFloat) : at::Tensor();
  float* sp = save_scale ? s.data_ptr<float>() : nullptr;
  const int64_t total = a.numel();
  const bool channels_last = l.rows && L > 1;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bnlab_noise", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (!channels_last) {
      // memory order is the logical order: e = (n·C + c)·L + l
      at::parallel_for(0, (total + kNoiseBlock - 1) / kNoiseBlock, 1, [&](int64_t b0, int64_t b1) {
        alignas(64) float z[kNoiseBlock], v[kNoiseBlock];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t e0 = b * kNoiseBlock, e1 = std::min(total, e0 + kNoiseBlock);
          draw_range(p, e0, e1, z, v);
          for (int64_t e = e0; e < e1;) {
            if (L == 1) {                                            // rows (n, c): c runs with e
              const int64_t c = e % C, run = std::min(e1 - e, C - c);
              noise_run<scalar_t, true>(ap + e, yp + e, sp ? sp + e : nullptr, run, z + (e - e0), v + (e - e0),
                                        p.sigma.data() + c, p.mu0.data() + c, p.r_sigma, p.two_r_mu);
              e += run;
            } else {                                                 // one (n, c) row of L values
              const int64_t row = e / L, c = row % C, run = std::min(e1, (row + 1) * L) - e;
              noise_run<scalar_t, false>(ap + e, yp + e, sp ? sp + e : nullptr, run, z + (e - e0), v + (e - e0),
                                         p.sigma.data() + c, p.mu0.data() + c, p.r_sigma, p.two_r_mu);
              e += run;
            }
          }
        }
      });
    } else {
      // channels_last: memory (n, l, c), logical (n, c, l). Per sample, draw the (C, L) slab in
      // logical order, transpose it tile by tile into (l, c) and apply row by row.
      at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
        std::vector<float> zl(C * L), vl(C * L), zt(C * 16), vt(C * 16);
        for (int64_t i = n0; i < n1; ++i) {
          draw_range(p, i * C * L, (i + 1) * C * L, zl.data(), vl.data());
          for (int64_t l0 = 0; l0 < L; l0 += 16) {
            const int64_t nl = std::min<int64_t>(16, L - l0);
            for (int64_t c = 0; c < C; ++c)
              for (int64_t k = 0; k < nl; ++k) {
                zt[k * C + c] = zl[c * L + l0 + k];
                vt[k * C + c] = vl[c * L + l0 + k];
              }
            for (int64_t k = 0; k < nl; ++k) {
              const int64_t off = (i * L + l0 + k) * C;
              noise_run<scalar_t, true>(ap + off, yp + off, sp ? sp + off : nullptr, C, zt.data() + k * C,
                                        vt.data() + k * C, p.sigma.data(), p.mu0.data(), p.r_sigma, p.two_r_mu);
            }
          }
        }
      });
    }
  });
  return {y, s};
}

// The draws alone, for benchmarks: z, v for n logical elements into per-thread blocks that stay
// in cache (no data read or written); returns Σ z + Σ v so that nothing is optimized away
double noise_draws(int64_t n, int64_t seed, int64_t step) {
  const NoiseParams p = noise_params(uint64_t(seed), uint64_t(step), 1, 0.5, 1.25, 0.1, 0.1);
  std::vector<double> sums(at::get_num_threads() + 1, 0.0);
  at::parallel_for(0, (n + kNoiseBlock - 1) / kNoiseBlock, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float z[kNoiseBlock], v[kNoiseBlock];
    double acc = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * kNoiseBlock, e1 = std::min(n, e0 + kNoiseBlock);
      draw_range(p, e0, e1, z, v);
      acc += z[0] + v[e1 - e0 - 1];
    }
    sums[at::get_thread_num()] += acc;
  });
  double total = 0;
  for (double x : sums) total += x;
  return total;
}

// z, v for the logical elements [first, first + n), for tests (indices past 2³² included)
std::vector<at::Tensor> noise_values(int64_t first, int64_t n, int64_t seed, int64_t step) {
  TORCH_CHECK(first >= 0 && n >= 0, "noise_values: first, n ≥ 0");
  const NoiseParams p = noise_params(uint64_t(seed), uint64_t(step), 1, 0.5, 1.25, 0.1, 0.1);
  at::Tensor z = at::empty({n}, at::kFloat), v = at::empty({n}, at::kFloat);
  if (n > 0) draw_range(p, first, first + n, z.data_ptr<float>(), v.data_ptr<float>());
  return {z, v};
}

// Noisy BN's gradient dy·s, s saved by nonstationary_noise in the same layout (float32)
at::Tensor noise_grad(const at::Tensor& dy, const at::Tensor& s) {
  TORCH_CHECK(dy.device().is_cpu() && s.device().is_cpu(), "noise_grad: CPU tensors");
  TORCH_CHECK(dy.sizes() == s.sizes() && dy.strides() == s.strides() && s.scalar_type() == at::kFloat,
              "noise_grad: dy and s must have the same shape and layout, s float32");
  TORCH_CHECK(dy.scalar_type() == at::kFloat || dy.scalar_type() == at::kDouble, "noise_grad: float32 or float64 dy");
  layout_of(dy);                                                     // dense: contiguous or channels_last
  at::Tensor out = empty_out(dy, dy.scalar_type());
  const int64_t n = dy.numel();
  const float* sp = s.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "bnlab_noise_grad", [&] {
    const scalar_t* g = dy.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = g[i] * scalar_t(sp[i]);
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnlab CPU batch-norm kernels";
  // the backend interface (bnlab.kernels.dispatch)
  m.def("forward_train", &forward_train, "training forward: (y, mean, var, invstd); updates running stats if given",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("act") = 0, py::arg("slope") = 0.0,
        py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(), py::arg("momentum") = 0.0,
        py::arg("unbiased") = true);
  m.def("group_backward", &group_backward, "per-group backward: (dx, sum dy*xhat, sum dy)",
        py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("sizes"),
        py::arg("project") = true);
  m.def("forward_eval", &forward_eval, "eval forward with given statistics", py::arg("x"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("act") = 0,
        py::arg("slope") = 0.0);
  m.def("backward_train", &backward_train, "training backward: (dx, dgamma, dbeta)");
  m.def("group_cross", &group_cross, "whitening's covariance pass alone (the layers call the whiten_* entries): Σ (a − μ_a)(b − μ_b)ᵀ per group of G channels and Σ a (float64)",
        py::arg("a"), py::arg("mu_a"), py::arg("b"), py::arg("mu_b"), py::arg("G"));
  m.def("group_apply", &group_apply, "whitening's apply pass alone (the layers call the whiten_* entries): A·a + B·b + c per group of channels, in a's layout",
        py::arg("a"), py::arg("A"), py::arg("b"), py::arg("B"), py::arg("c"));
  m.def("whiten_moments", &whiten_moments,
        "whitening's forward statistics: (μ, Σ = P/m + εI, whether Σ is finite), one pass shifted by K where close enough",
        py::arg("x"), py::arg("shift"), py::arg("G"), py::arg("eps"));
  m.def("whiten_apply", &whiten_apply, "whitening's output diag(γ)W·(x − μ) + β in x's layout",
        py::arg("x"), py::arg("W"), py::arg("weight"), py::arg("bias"), py::arg("mean"));
  m.def("whiten_grad_sums", &whiten_grad_sums, "whitening's backward sums: (diag(γ)·Σ dy(x − μ)ᵀ, dγ, dβ)",
        py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("W"), py::arg("weight"));
  m.def("whiten_grad_x", &whiten_grad_x, "whitening's dx from dΣ and dβ, in x's layout",
        py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("W"), py::arg("weight"), py::arg("dsigma"),
        py::arg("dbeta"));
  m.def("scaled_eval", &scaled_eval, "inference (x − μ)/s·γ + β with s from a per-group scale (see scaled_eval)",
        py::arg("x"), py::arg("mean"), py::arg("scale"), py::arg("weight"), py::arg("bias"), py::arg("add"),
        py::arg("sqrt_scale"));
  m.def("batch_norm_train", &batch_norm_train, "training BN as a C++ autograd node (forward_train / backward_train)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("momentum"), py::arg("unbiased"));
  m.def("batch_norm_train_fast", &batch_norm_train_fast,
        "batch_norm_train when functional.batch_norm's training path would call it, else None (all its checks in one call)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("momentum"), py::arg("unbiased"));
  m.def("takes", [](const at::Tensor& x) { return fast_call_ok(x, /*training=*/false, {}, c10::nullopt, c10::nullopt); },
        "whether the kernels run x as it is (enabled, not traced or transformed, a dense CPU float32/float64/"
        "bfloat16 tensor of ≥ 2 dims and ≥ 1 value): dispatch's check for the variants' one-call entries, in one call",
        py::arg("x"));
  m.def("batch_norm_eval_fast", &batch_norm_eval_fast,
        "forward_eval when functional.batch_norm's inference path would call it, else None (all its checks in one call)",
        py::arg("x"), py::arg("running_mean"), py::arg("running_var"), py::arg("weight"), py::arg("bias"),
        py::arg("eps"));
  m.def("set_graph_backward", [](py::object fn) { graph_backward() = fn; },
        "the differentiable backward batch_norm_train's node calls under create_graph=True");
  m.def("group_train", &group_train,
        "Ghost BN / Batch Renorm / DetachedNorm training step as a C++ autograd node (see GroupTrain)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("sizes"), py::arg("eps"), py::arg("scale"),
        py::arg("project"), py::arg("renorm"), py::arg("rmax"), py::arg("dmax"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("update"), py::arg("momentum"), py::arg("unbiased"));
  m.def("lp_train", &lp_train, "lp normalization's training step as a C++ autograd node (see LpTrain)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("p"), py::arg("groups"), py::arg("eps"),
        py::arg("running_mean"), py::arg("running_scale"), py::arg("num_batches_tracked"), py::arg("momentum"));
  m.def("set_lp_graph_backward", [](py::object fn) { lp_graph_backward() = fn; },
        "the differentiable backward lp_train's node calls under create_graph=True");
  m.def("set_group_graph_backward", [](py::object fn) { group_graph_backward() = fn; },
        "the differentiable backward group_train's node calls under create_graph=True");
  m.def("bn_act_backward", &bn_act_backward, "fused BN+activation backward from the output or the input",
        py::arg("da"), py::arg("v"), py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("bias"),
        py::arg("act"), py::arg("slope"), py::arg("from_input"));
  m.def("newton_inv_sqrt", &newton_inv_sqrt,
        "IterNorm: (W, P) — Σ^(−½) by T Newton iterations per group; P the iterates P_0 … P_T and their squares and cubes (see newton_inv_sqrt)",
        py::arg("sigma"), py::arg("T"));
  m.def("newton_inv_sqrt_backward", &newton_inv_sqrt_backward, "IterNorm: ∂ℓ/∂Σ from ∂ℓ/∂W, Σ and the iterates",
        py::arg("dW"), py::arg("sigma"), py::arg("P"));
  m.def("zca_inv_sqrt", &zca_inv_sqrt,
        "ZCA: (W, D, s) — Σ^(−½) per group by Jacobi's eigendecomposition Σ = D·diag(s²)·Dᵀ (see zca_inv_sqrt)",
        py::arg("sigma"));
  m.def("whiten_train", &whiten_train,
        "whitening's training step (ZCA with groups ≤ 16, IterNorm, PCA) as a C++ autograd node (see WhitenTrain)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("G"), py::arg("eps"), py::arg("kind"), py::arg("T"),
        py::arg("shift"), py::arg("running_mean"), py::arg("running_whitening"), py::arg("num_batches_tracked"),
        py::arg("momentum"));
  m.def("set_whiten_graph_backward", [](py::object fn) { whiten_graph_backward() = fn; },
        "register whitening.py's _graph_backward, which WhitenTrain's node calls under create_graph=True");
  m.def("zca_inv_sqrt_backward", &zca_inv_sqrt_backward, "ZCA: ∂ℓ/∂Σ from ∂ℓ/∂W and zca_inv_sqrt's D, s",
        py::arg("dW"), py::arg("D"), py::arg("s"));
  m.def("nonstationary_noise", &nonstationary_noise,
        "Noisy BN's noise: (s·a + m, s) with s, m drawn per element from Philox4x32-10 (see nonstationary_noise)",
        py::arg("a"), py::arg("seed"), py::arg("step"), py::arg("n_mu"), py::arg("n_sigma"), py::arg("r_mu"),
        py::arg("r_sigma"), py::arg("save_scale"));
  m.def("noise_grad", &noise_grad, "Noisy BN's gradient dy·s (s from nonstationary_noise, same layout)",
        py::arg("dy"), py::arg("s"));
  m.def("empty_cache", &empty_cache, "release the pooled output regions; returns bytes released");
  m.def("cache_info", &cache_info, "(regions, bytes, cap) of the output pool");

  // switches and counters for bnlab.kernels (disabled(), dx_over_dy(), calls), its tests and
  // benchmarks: not part of the backend interface
  py::module_ c = m.def_submodule("control", "switches, counters and single passes (bnlab.kernels, tests, benchmarks)");
  c.def("set_enabled", [](bool on) { return fast_enabled.exchange(on); },
        "whether batch_norm_train_fast and batch_norm_eval_fast may run (kernels.disabled() turns them off); returns the old setting");
  c.def("set_dx_over_dy", [](bool on) { return dx_over_dy.exchange(on); },
        "whether the node may write dx over the incoming gradient (default True); returns the old setting");
  c.def("set_stream_threshold", [](int64_t bytes) {
    const int64_t before = stream_threshold_bytes;
    stream_threshold_bytes = bytes;
    return before;
  }, "outputs of at least this many bytes are written with non-temporal stores (-1: never); returns the old value");
  c.def("fast_forward_calls", [] { return fast_forward_calls.load(); },
        "how many times batch_norm_train_fast recorded the node");
  c.def("fast_eval_calls", [] { return fast_eval_calls.load(); },
        "how many times batch_norm_eval_fast ran forward_eval");
  c.def("node_backward_calls", [] { return node_backward_calls.load(); },
        "how many times batch_norm_train's node ran backward_train");
  c.def("node_inplace_calls", [] { return node_inplace_calls.load(); },
        "how many of those wrote dx over the incoming gradient (no other reference) or its converted copy");
  c.def("lp_node_calls", [] { return lp_node_calls.load(); },
        "how many times lp_train's node ran its closed-form backward");
  c.def("group_node_calls", [] { return group_node_calls.load(); },
        "how many times group_train's node ran its closed-form backward");
  c.def("whiten_node_calls", [] { return whiten_node_calls.load(); },
        "how many times whiten_train's node ran its compiled backward");
  c.def("noise_values", &noise_values, "Noisy BN's (z, v) for the logical elements [first, first + n), for tests",
        py::arg("first"), py::arg("n"), py::arg("seed"), py::arg("step"));
  c.def("noise_draws", &noise_draws, "Noisy BN's draws alone for n values (no data touched), for benchmarks",
        py::arg("n"), py::arg("seed"), py::arg("step"));
  c.def("bench_pass", &bench_pass, "one pass alone (0 statistics, 1 normalize, 2 gradient sums, 3 dx), for benchmarks");
}
