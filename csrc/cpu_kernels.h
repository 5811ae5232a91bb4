// Host entry points of the CPU kernels (fp32). Like the CUDA ones they take raw pointers, sizes and strides in
// elements, and nothing here knows about torch.
#pragma once
#include <cstddef>
#include <cstdint>

namespace sinkhorn_kernels::cpu {

constexpr int kVectorFloats = 16;  // floats per vector in every build: bs and D come in multiples of it

// One (batch, head) of a block-attention call. Rows of q, k, v, out, dout, dq, dk, dv are D contiguous floats
// with the given row strides; idx / w: [Nq, R] contiguous routes (own bucket last when present; idx == Nk is
// the null bucket, -1 no block); masks: [T] bytes (1 = real) or null.
struct Head {
  const float *q, *k, *v;
  int64_t q_rs, k_rs, v_rs;
  const int64_t* idx;
  const float* w;
  const float *null_k, *null_v;
  const uint8_t *q_mask, *kv_mask;
  bool rotated;  // the rotated causal frame: the last bucket's rows 1.. are the sequence's first tokens
  float* out;    // forward: [Tq, D] written; may be q (a query bucket's queries are read before its output is written)
  int64_t out_rs;
  const float* dout;  // backward
  int64_t dout_rs;
  float *dq, *dk, *dv;  // written; dq may be q or dout, dk may be k and dv v (each is read before it is overwritten)
  int64_t dq_rs, dk_rs, dv_rs;
  float* dw;                  // [Nq, R] written, or null
  float *dnull_k, *dnull_v;   // [D] added into, where there is a null bucket
};

struct Layout {
  int64_t Nq, bs, Nk, kbs, R, D;
  bool causal;
  float scale;
};

// bs and D must be multiples of kVectorFloats. The heads are spread over n_workers threads (the
// caller's among them); scratch: scratch_floats(lay, backward, n_workers) floats, any contents.
// A worker's part: the queries' (backward: and the output gradient's) transposes [D, bs], one (backward: three)
// scores-shaped [L, bs] buffers, (backward:) two [bs] vectors and the head's dk and dv [Tk, D].
inline int64_t scratch_floats(const Layout& lay, bool backward, int n_workers) {
  const int64_t L = lay.R * lay.kbs;
  return n_workers * (backward ? 2 * lay.D * lay.bs + 3 * L * lay.bs + 2 * lay.bs + 2 * lay.Nk * lay.kbs * lay.D
                               : lay.D * lay.bs + L * lay.bs);
}
void block_attention_forward(const Layout& lay, const Head* heads, int64_t n_heads, int n_workers, float* scratch);
void block_attention_backward(const Layout& lay, const Head* heads, int64_t n_heads, int n_workers, float* scratch);
// the instruction set of the build in use: "avx512", "avx2" or "generic"
const char* isa_name();
// Asks the OS to back the pages of [p, p + bytes), not yet touched, with transparent huge pages (Linux, where
// they are enabled for madvise or always); whether it took the advice.
bool advise_huge_pages(void* p, size_t bytes);

}  // namespace sinkhorn_kernels::cpu
