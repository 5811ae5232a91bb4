// Block attention on the CPU in fp32, forward and backward fused per query bucket: the routed key / value blocks
// are read in place (no gathered copies), and scores, probabilities and their gradients live in a few small
// per-thread buffers that stay in cache. Scores are held transposed, [keys, queries], so that the softmax and
// every product run along contiguous query vectors: K_r Q^T, P^T V needs no transpose of a key block, only one
// of each query bucket's queries (and in backward of its output gradient).
//
// Compiled once per instruction set (SK_CPU_ISA names the namespace); cpu_dispatch.cpp picks one at run time.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <omp.h>
#include <vector>

#include "cpu_kernels.h"

namespace sinkhorn_kernels::cpu::SK_CPU_ISA {

namespace {

constexpr int W = kVectorFloats;
typedef float vec __attribute__((vector_size(64)));
typedef int32_t ivec __attribute__((vector_size(64)));
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline vec splat(float x) { return x - vec{}; }  // x - 0 is x, even for -0: it folds to a broadcast
inline vec vmax(vec a, vec b) { return a > b ? a : b; }
inline float hsum(vec v) {
  float s = 0;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// exp, to within a few ulp; 0 below -87 (and for -inf)
inline vec vexp(vec x) {
  vec t = x * 1.44269504088896341f;
  t = t < -126.f ? splat(-126.f) : t;
  t = t > 126.f ? splat(126.f) : t;
  const vec n = (t + 12582912.f) - 12582912.f;  // round to nearest
  const vec f = t - n;                           // 2^t = 2^n 2^f, |f| <= 1/2
  vec p = splat(1.54035304e-4f);
  for (float c : {1.33335581e-3f, 9.61812911e-3f, 5.55041087e-2f, 2.40226507e-1f, 6.93147181e-1f, 1.f}) p = p * f + c;
  const ivec e = (__builtin_convertvector(n, ivec) + 127) << 23;
  const vec r = p * (vec)e;
  return x < -87.f ? vec{} : r;
}

// C (M x N, row stride ldc) = alpha A B (+ C if acc): A(m, k) = a[m * sam + k * sak], B's row k at b + k * ldb;
// N is a multiple of W. A tile of MR rows by NV vectors stays in registers over the whole K loop.
template <int MR, int NV>
inline void tile(int64_t K, const float* a, int64_t sam, int64_t sak, const float* b, int64_t ldb, float* c,
                 int64_t ldc, float alpha, bool acc) {
  vec r[MR][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * ldb + v * W);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const vec am = splat(a[m * sam + k * sak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) r[m][v] += am * bv[v];
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + m * ldc + v * W;
      const vec out = r[m][v] * alpha;
      store(cp, acc ? load(cp) + out : out);
    }
  }
}

template <int MR>
inline void tile_row(int nv, int64_t K, const float* a, int64_t sam, int64_t sak, const float* b, int64_t ldb,
                     float* c, int64_t ldc, float alpha, bool acc) {
  switch (nv) {
    case 4: return tile<MR, 4>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc);
    case 3: return tile<MR, 3>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc);
    case 2: return tile<MR, 2>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc);
    default: return tile<MR, 1>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc);
  }
}

// Rows (up to two blocks of rows of one width) to bring into cache while a product runs, a few lines after each of
// its tiles. What a bucket reads next (routed blocks, accumulator blocks, the next bucket's rows) are strided rows of
// large buffers that the hardware prefetchers do not foresee; spread over the product before, their misses overlap
// its arithmetic, where a burst of prefetches would stall much as the misses do.
class Fetch {
 public:
  Fetch() = default;
  Fetch(const float* p, int64_t rows, int64_t rs, int64_t width) { add(p, rows, rs, width); }
  Fetch& add(const float* p, int64_t rows, int64_t rs, int64_t width) {
    if (p && rs && n_ < 2) blocks_[n_++] = {p, rows, rs, (width + W - 1) / W};  // rs 0: one repeated row, cached
    return *this;
  }
  int64_t lines() const {
    int64_t n = 0;
    for (int b = 0; b < n_; ++b) n += blocks_[b].rows * blocks_[b].per_row;
    return n;
  }
  void next(int64_t n) {
    // counted by row and vector: a division per line took about a fifth of gemm's time in the profile
    for (; n > 0 && b_ < n_; --n) {
      const Block& b = blocks_[b_];
      __builtin_prefetch(b.p + row_ * b.rs + col_ * W, 0, 2);
      if (++col_ < b.per_row) continue;
      col_ = 0;
      if (++row_ == b.rows) row_ = 0, ++b_;
    }
  }

 private:
  struct Block {
    const float* p;
    int64_t rows, rs, per_row;
  };
  Block blocks_[2];
  int n_ = 0, b_ = 0;
  int64_t row_ = 0, col_ = 0;
};

void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t sam, int64_t sak, const float* b, int64_t ldb,
          float* c, int64_t ldc, float alpha, bool acc, Fetch fetch = {}) {
  const int64_t tiles = ((M + 3) / 4) * ((N + 4 * W - 1) / (4 * W)), per_tile = (fetch.lines() + tiles - 1) / tiles;
  for (int64_t n = 0; n < N; n += 4 * W) {
    const int nv = static_cast<int>(std::min<int64_t>(4, (N - n) / W));
    for (int64_t m = 0; m < M; m += 4, fetch.next(per_tile)) {
      const float* am = a + m * sam;
      float* cm = c + m * ldc + n;
      switch (std::min<int64_t>(4, M - m)) {
        case 4: tile_row<4>(nv, K, am, sam, sak, b + n, ldb, cm, ldc, alpha, acc); break;
        case 3: tile_row<3>(nv, K, am, sam, sak, b + n, ldb, cm, ldc, alpha, acc); break;
        case 2: tile_row<2>(nv, K, am, sam, sak, b + n, ldb, cm, ldc, alpha, acc); break;
        default: tile_row<1>(nv, K, am, sam, sak, b + n, ldb, cm, ldc, alpha, acc);
      }
    }
  }
}

// 16 x 16 floats in registers, transposed in four rounds: round s swaps the off-diagonal s x s blocks of every
// 2s x 2s block, pairing rows i and i + s
inline void transpose16(vec* r) {
  for (int s = 8; s >= 1; s /= 2) {
    ivec lo, hi;
    for (int j = 0; j < W; ++j) {
      lo[j] = (j & s) ? W + j - s : j;
      hi[j] = (j & s) ? W + j : j + s;
    }
    for (int i = 0; i < W; ++i)
      if (!(i & s)) {
        const vec x = r[i], y = r[i + s];
        r[i] = __builtin_shuffle(x, y, lo);
        r[i + s] = __builtin_shuffle(x, y, hi);
      }
  }
}

// rows x cols of src (row stride ld) into dst [cols, rows]; both multiples of W
void transpose(const float* src, int64_t ld, int64_t rows, int64_t cols, float* dst) {
  vec r[W];
  for (int64_t r0 = 0; r0 < rows; r0 += W)
    for (int64_t c0 = 0; c0 < cols; c0 += W) {
      for (int i = 0; i < W; ++i) r[i] = load(src + (r0 + i) * ld + c0);
      transpose16(r);
      for (int i = 0; i < W; ++i) store(dst + (c0 + i) * rows + r0, r[i]);
    }
}

void fill_rows(float* s, int64_t rows, int64_t cols, float x) { std::fill(s, s + rows * cols, x); }

// One query bucket's routes: block j of route r (clamped for pointers), whether it is the null bucket or no block
struct Route {
  int64_t j;
  float w;
  bool null, none;
};

struct Bucket {
  const Layout& lay;
  const Head& hd;
  int64_t i;
  std::vector<Route> routes;

  Bucket(const Layout& l, const Head& h, int64_t i_) : lay(l), hd(h), i(i_), routes(l.R) {
    for (int64_t r = 0; r < lay.R; ++r) {
      const int64_t j = hd.idx[i * lay.R + r];
      routes[r] = {j, hd.w[i * lay.R + r], j == lay.Nk, j < 0};
    }
  }
  const float* q() const { return hd.q + i * lay.bs * hd.q_rs; }
  const float* dout() const { return hd.dout + i * lay.bs * hd.dout_rs; }
  // the rows of a route's keys / values and their stride (the null bucket: one row repeated)
  const float* k(const Route& r) const { return r.null ? hd.null_k : hd.k + r.j * lay.kbs * hd.k_rs; }
  int64_t k_rs(const Route& r) const { return r.null ? 0 : hd.k_rs; }
  const float* v(const Route& r) const { return r.null ? hd.null_v : hd.v + r.j * lay.kbs * hd.v_rs; }
  int64_t v_rs(const Route& r) const { return r.null ? 0 : hd.v_rs; }
  // the rows route r reads (none past the last route or for no block), `rows` / `stride` as k and k_rs
  template <typename Rows, typename Stride>
  Fetch route_rows(int64_t r, Rows rows, Stride stride) const {
    if (r >= lay.R || routes[r].none) return {};
    return Fetch(rows(routes[r]), lay.kbs, stride(routes[r]), lay.D);
  }
  Fetch keys(int64_t r) const {
    return route_rows(r, [&](const Route& t) { return k(t); }, [&](const Route& t) { return k_rs(t); });
  }
  Fetch values(int64_t r) const {
    return route_rows(r, [&](const Route& t) { return v(t); }, [&](const Route& t) { return v_rs(t); });
  }
  // route r's block of an accumulator [Tk, D]
  Fetch block_of(const float* acc, int64_t r) const {
    if (r >= lay.R || routes[r].none || routes[r].null) return {};
    return Fetch(acc + routes[r].j * lay.kbs * lay.D, lay.kbs, lay.D, lay.D);
  }

  // scores [L, bs] of the queries' transpose qt [D, bs]: s = scale w_r K_r Q^T, masked; raw (if not null) gets
  // K_r Q^T unscaled, for the route weights' gradient
  void scores(const float* qt, float* s, float* raw, Fetch after) const {
    const int64_t bs = lay.bs, kbs = lay.kbs, L = lay.R * kbs;
    for (int64_t r = 0; r < lay.R; ++r) {
      const Route& rt = routes[r];
      float* sr = s + r * kbs * bs;
      if (rt.none) {
        fill_rows(sr, kbs, bs, NEG_INF);
        if (raw) fill_rows(raw + r * kbs * bs, kbs, bs, 0.f);
        continue;
      }
      const float a = lay.scale * rt.w;
      const Fetch then = r + 1 < lay.R ? keys(r + 1) : after;
      if (raw) {
        float* ur = raw + r * kbs * bs;
        gemm(kbs, bs, lay.D, k(rt), k_rs(rt), 1, qt, bs, ur, bs, 1.f, false, then);
        for (int64_t e = 0; e < kbs * bs; ++e) sr[e] = a * ur[e];
      } else {
        gemm(kbs, bs, lay.D, k(rt), k_rs(rt), 1, qt, bs, sr, bs, a, false, then);
      }
      if (hd.kv_mask && !rt.null)
        for (int64_t t = 0; t < kbs; ++t)
          if (!hd.kv_mask[rt.j * kbs + t]) fill_rows(sr + t * bs, 1, bs, NEG_INF);
    }
    if (lay.causal) {
      float* own = s + (L - kbs) * bs;  // the own bucket is the last route; key t sees queries t..
      for (int64_t t = 1; t < kbs; ++t) std::fill(own + t * bs, own + t * bs + std::min(t, bs), NEG_INF);
      if (hd.rotated && i == lay.Nq - 1)
        // its rows 1.. are the wrapped-around first tokens: they see only their own earlier tokens, not the
        // routed blocks nor key 0 (the last token)
        for (int64_t t = 0; t <= L - kbs; ++t) std::fill(s + t * bs + 1, s + (t + 1) * bs, NEG_INF);
    }
  }

  // softmax over the keys (rows) of s [L, bs], in place; queries that see no key (or are masked) get zeros
  void softmax(float* s) const {
    const int64_t bs = lay.bs, L = lay.R * lay.kbs;
    for (int64_t c = 0; c < bs; c += W) {
      vec mx = splat(NEG_INF);
      for (int64_t t = 0; t < L; ++t) mx = vmax(mx, load(s + t * bs + c));
      mx = mx == NEG_INF ? vec{} : mx;
      vec sum = {};
      for (int64_t t = 0; t < L; ++t) {
        const vec e = vexp(load(s + t * bs + c) - mx);
        store(s + t * bs + c, e);
        sum += e;
      }
      vec inv = sum > 0.f ? 1.f / sum : vec{};
      if (hd.q_mask)
        for (int l = 0; l < W; ++l)
          if (!hd.q_mask[i * bs + c + l]) inv[l] = 0.f;
      for (int64_t t = 0; t < L; ++t) store(s + t * bs + c, load(s + t * bs + c) * inv);
    }
  }

  // C (bs x D, row stride ldc) = sum_r alpha_r A_r X_r over the real routes, A_r(q, t) = p[(r kbs + t) bs + q]
  // (scores-shaped, transposed) and X_r a route's key or value rows; zeros without any
  template <typename Rows, typename Stride, typename Alpha>
  void mix(const float* p, Rows rows, Stride stride, Alpha alpha, float* c, int64_t ldc, Fetch after) const {
    const int64_t bs = lay.bs, kbs = lay.kbs;
    bool acc = false;
    for (int64_t r = 0; r < lay.R; ++r) {
      const Route& rt = routes[r];
      if (rt.none) continue;
      gemm(bs, lay.D, kbs, p + r * kbs * bs, 1, bs, rows(rt), stride(rt), c, ldc, alpha(rt), acc,
           r + 1 < lay.R ? route_rows(r + 1, rows, stride) : after);
      acc = true;
    }
    if (!acc)
      for (int64_t q = 0; q < bs; ++q) std::fill(c + q * ldc, c + q * ldc + lay.D, 0.f);
  }

  // per route: C_j += alpha_r A_r^T Y (kbs x D) into the route's rows of acc [Tk, D], or into null [D] summed
  // over the block; A_r = p's rows of route r [kbs, bs], Y the bucket's rows [bs, D] (stride ldy)
  template <typename Alpha>
  void spread(const float* p, const float* y, int64_t ldy, Alpha alpha, float* acc_rows, float* null,
              float* colsum, Fetch after) const {
    const int64_t bs = lay.bs, kbs = lay.kbs, D = lay.D;
    for (int64_t r = 0; r < lay.R; ++r) {
      const Route& rt = routes[r];
      if (rt.none) continue;
      const float* pr = p + r * kbs * bs;
      if (rt.null) {
        std::fill(colsum, colsum + bs, 0.f);
        for (int64_t t = 0; t < kbs; ++t)
          for (int64_t q = 0; q < bs; ++q) colsum[q] += pr[t * bs + q];
        gemm(1, D, bs, colsum, 0, 1, y, ldy, null, D, alpha(rt), true);
      } else {
        gemm(kbs, D, bs, pr, bs, 1, y, ldy, acc_rows + rt.j * kbs * D, D, alpha(rt), true,
             r + 1 < lay.R ? block_of(acc_rows, r + 1) : after);
      }
    }
  }
};

// The work items [0, n) spread over n_workers OpenMP threads that each take the next unclaimed one: body(item,
// worker). OpenMP rather than threads of our own: torch's runtime (libgomp, loaded first) serves both, so its
// workers, still spinning after torch's last parallel op, take the work instead of competing with it for cores.
template <typename Body>
void parallel(int n_workers, int64_t n, Body body) {
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(n_workers)
  {
    const int worker = omp_get_thread_num();
    for (int64_t it; (it = next.fetch_add(1)) < n;) body(it, worker);
  }
}

}  // namespace

void block_attention_forward(const Layout& lay, const Head* heads, int64_t n_heads, int n_workers, float* scratch) {
  const int64_t bs = lay.bs, D = lay.D, per_worker = scratch_floats(lay, false, 1);
  // a few buckets per item: enough to keep the claim counter cold, few enough to balance the workers
  const int64_t per_item = 4, items_per_head = (lay.Nq + per_item - 1) / per_item;
  parallel(n_workers, n_heads * items_per_head, [&](int64_t item, int worker) {
    const Head& hd = heads[item / items_per_head];
    float *qt = scratch + worker * per_worker, *s = qt + D * bs;
    const int64_t i0 = (item % items_per_head) * per_item;
    for (int64_t i = i0; i < std::min(lay.Nq, i0 + per_item); ++i) {
      const Bucket b(lay, hd, i), next(lay, hd, std::min(i + 1, lay.Nq - 1));
      transpose(b.q(), hd.q_rs, bs, D, qt);
      b.scores(qt, s, nullptr, b.values(0));
      b.softmax(s);
      // while the last product runs: the next bucket's queries and first keys
      b.mix(
          s, [&](const Route& r) { return b.v(r); }, [&](const Route& r) { return b.v_rs(r); },
          [](const Route& r) { return r.w; }, hd.out + i * bs * hd.out_rs, hd.out_rs,
          next.keys(0).add(next.q(), bs, hd.q_rs, D));
    }
  });
}

void block_attention_backward(const Layout& lay, const Head* heads, int64_t n_heads, int n_workers,
                              float* scratch) {
  const int64_t bs = lay.bs, kbs = lay.kbs, L = lay.R * kbs, D = lay.D, Tk = lay.Nk * kbs;
  const int64_t per_worker = scratch_floats(lay, true, 1);
  parallel(n_workers, n_heads, [&](int64_t h, int worker) {
    const Head& hd = heads[h];
    float *qt = scratch + worker * per_worker, *dot = qt + D * bs, *raw = dot + D * bs, *s = raw + L * bs,
          *g = s + L * bs, *colsum = g + L * bs, *delta = colsum + bs, *dk = delta + bs, *dv = dk + Tk * D;
    std::fill(dk, dv + Tk * D, 0.f);
    for (int64_t i = 0; i < lay.Nq; ++i) {
      const Bucket b(lay, hd, i), next(lay, hd, std::min(i + 1, lay.Nq - 1));
      const float* dout = b.dout();
      transpose(b.q(), hd.q_rs, bs, D, qt);
      transpose(dout, hd.dout_rs, bs, D, dot);
      b.scores(qt, s, raw, b.values(0));
      b.softmax(s);
      // g: dO V_r^T, then dP = w_r dO V_r^T, then dS
      for (int64_t r = 0; r < lay.R; ++r) {
        const Route& rt = b.routes[r];
        float* gr = g + r * kbs * bs;
        if (rt.none) fill_rows(gr, kbs, bs, 0.f);
        else gemm(kbs, bs, D, b.v(rt), b.v_rs(rt), 1, dot, bs, gr, bs, 1.f, false,
                  r + 1 < lay.R ? b.values(r + 1) : b.block_of(dv, 0));
      }
      std::fill(delta, delta + bs, 0.f);
      for (int64_t r = 0; r < lay.R; ++r) {
        const float w = b.routes[r].w;
        vec dw_v = {};
        for (int64_t t = r * kbs; t < (r + 1) * kbs; ++t)
          for (int64_t c = 0; c < bs; c += W) {
            const vec p = load(s + t * bs + c), gv = load(g + t * bs + c), dp = gv * w;
            dw_v += p * gv;
            store(g + t * bs + c, dp);
            store(delta + c, load(delta + c) + p * dp);
          }
        if (hd.dw) hd.dw[i * lay.R + r] = hsum(dw_v);
      }
      for (int64_t r = 0; r < lay.R; ++r) {
        vec dw_k = {};
        for (int64_t t = r * kbs; t < (r + 1) * kbs; ++t)
          for (int64_t c = 0; c < bs; c += W) {
            const vec ds = load(s + t * bs + c) * (load(g + t * bs + c) - load(delta + c));
            store(g + t * bs + c, ds);
            dw_k += ds * load(raw + t * bs + c);
          }
        if (hd.dw) hd.dw[i * lay.R + r] += lay.scale * hsum(dw_k);
      }
      // dV_j += w_r P_r^T dO and dK_j += scale w_r dS_r^T Q, then dQ = sum_r scale w_r dS_r K_r over the
      // queries or the output gradient, which dq may be: their last reads are dK's and dV's
      // (while each runs, what the next one reads: at the end the next bucket's queries and output gradient)
      b.spread(s, dout, hd.dout_rs, [](const Route& r) { return r.w; }, dv, hd.dnull_v, colsum, b.block_of(dk, 0));
      b.spread(g, b.q(), hd.q_rs, [&](const Route& r) { return lay.scale * r.w; }, dk, hd.dnull_k, colsum,
               b.keys(0));
      b.mix(
          g, [&](const Route& r) { return b.k(r); }, [&](const Route& r) { return b.k_rs(r); },
          [&](const Route& r) { return lay.scale * r.w; }, hd.dq + i * bs * hd.dq_rs, hd.dq_rs,
          Fetch(next.q(), bs, hd.q_rs, D).add(next.dout(), bs, hd.dout_rs, D));
    }
    // every bucket of this head has read its keys and values: their gradients may take their place
    for (int64_t t = 0; t < Tk; ++t) {
      std::memcpy(hd.dk + t * hd.dk_rs, dk + t * D, D * sizeof(float));
      std::memcpy(hd.dv + t * hd.dv_rs, dv + t * D, D * sizeof(float));
    }
  });
}

}  // namespace sinkhorn_kernels::cpu::SK_CPU_ISA
