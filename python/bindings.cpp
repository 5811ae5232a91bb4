// sinkhorn_kernels._C: the CUDA kernels for Python. Arguments are device pointers (ints), sizes, strides in
// elements, a dtype code (0 fp32, 1 fp16, 2 bf16) and the CUDA stream handle; no torch types cross this boundary.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <vector>

#include "kernels.h"

namespace py = pybind11;
using sinkhorn_kernels::BlockAttentionArgs;

namespace {

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void copy_strides(const std::vector<int64_t>& from, int64_t* to, size_t n, const char* name) {
  if (from.size() != n) throw std::invalid_argument(std::string(name) + " needs " + std::to_string(n) + " strides");
  for (size_t i = 0; i < n; ++i) to[i] = from[i];
}

// The call's description, from a dict with one key per field of BlockAttentionArgs.
BlockAttentionArgs args_from(const py::dict& d) {
  BlockAttentionArgs a{};
  auto get = [&](const char* key) { return d[key]; };
  a.q = ptr<const void>(get("q").cast<uintptr_t>());
  a.k = ptr<const void>(get("k").cast<uintptr_t>());
  a.v = ptr<const void>(get("v").cast<uintptr_t>());
  a.null_k = ptr<const void>(get("null_k").cast<uintptr_t>());
  a.null_v = ptr<const void>(get("null_v").cast<uintptr_t>());
  a.idx = ptr<const int32_t>(get("idx").cast<uintptr_t>());
  a.w = ptr<const float>(get("w").cast<uintptr_t>());
  a.q_mask = ptr<const bool>(get("q_mask").cast<uintptr_t>());
  a.kv_mask = ptr<const bool>(get("kv_mask").cast<uintptr_t>());
  copy_strides(get("q_strides").cast<std::vector<int64_t>>(), a.q_strides, 4, "q");
  copy_strides(get("k_strides").cast<std::vector<int64_t>>(), a.k_strides, 4, "k");
  copy_strides(get("v_strides").cast<std::vector<int64_t>>(), a.v_strides, 4, "v");
  copy_strides(get("q_mask_strides").cast<std::vector<int64_t>>(), a.q_mask_strides, 2, "q_mask");
  copy_strides(get("kv_mask_strides").cast<std::vector<int64_t>>(), a.kv_mask_strides, 2, "kv_mask");
  a.B = get("B").cast<int64_t>();
  a.H = get("H").cast<int64_t>();
  a.Nq = get("Nq").cast<int64_t>();
  a.Nk = get("Nk").cast<int64_t>();
  a.R = get("R").cast<int64_t>();
  a.bucket_size = get("bucket_size").cast<int64_t>();
  a.kv_bucket_size = get("kv_bucket_size").cast<int64_t>();
  a.dim_head = get("dim_head").cast<int64_t>();
  a.n_rotated_heads = get("n_rotated_heads").cast<int64_t>();
  a.causal = get("causal").cast<bool>();
  a.scale = get("scale").cast<float>();
  a.dtype = get("dtype").cast<int>();
  a.stream = get("stream").cast<uintptr_t>();
  return a;
}

std::vector<int64_t> checked(const std::vector<int64_t>& s, const char* name) {
  if (s.size() != 4) throw std::invalid_argument(std::string(name) + " needs 4 strides");
  return s;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of sinkhorn-kernels (raw pointers, no libtorch)";
  m.attr("cuda_architectures") = SINKHORN_KERNELS_CUDA_ARCHS;
  m.def("sinkhorn_forward",
        [](uintptr_t x, uintptr_t p, uintptr_t a, uintptr_t b, int64_t G, int64_t n, int64_t mm, int64_t iters,
           int dtype, uintptr_t stream) {
          py::gil_scoped_release release;
          sinkhorn_kernels::sinkhorn_forward(ptr<const void>(x), ptr<void>(p), ptr<float>(a), ptr<float>(b), G, n, mm,
                                             iters, dtype, stream);
        });
  m.def("sinkhorn_backward",
        [](uintptr_t x, uintptr_t dp, uintptr_t dx, uintptr_t a, uintptr_t b, uintptr_t ga, uintptr_t gb, int64_t G,
           int64_t n, int64_t mm, int64_t iters, int dtype, uintptr_t stream) {
          py::gil_scoped_release release;
          sinkhorn_kernels::sinkhorn_backward(ptr<const void>(x), ptr<const void>(dp), ptr<void>(dx),
                                              ptr<const float>(a), ptr<const float>(b), ptr<float>(ga),
                                              ptr<float>(gb), G, n, mm, iters, dtype, stream);
        });
  m.def("block_attention_forward", [](const py::dict& d, uintptr_t out, std::vector<int64_t> out_strides,
                                      uintptr_t lse) {
    const BlockAttentionArgs a = args_from(d);
    const auto os = checked(out_strides, "out");
    py::gil_scoped_release release;
    sinkhorn_kernels::block_attention_forward(a, ptr<void>(out), os.data(), ptr<float>(lse));
  });
  m.def("block_attention_backward",
        [](const py::dict& d, uintptr_t dout, std::vector<int64_t> dout_strides, uintptr_t lse, uintptr_t delta,
           uintptr_t readers, uintptr_t start, uintptr_t count, uintptr_t dq, std::vector<int64_t> dq_strides,
           uintptr_t dk, std::vector<int64_t> dk_strides, uintptr_t dv, std::vector<int64_t> dv_strides, uintptr_t dw,
           uintptr_t dnull_k, uintptr_t dnull_v) {
          const BlockAttentionArgs a = args_from(d);
          const auto dos = checked(dout_strides, "dout"), dqs = checked(dq_strides, "dq"),
                     dks = checked(dk_strides, "dk"), dvs = checked(dv_strides, "dv");
          py::gil_scoped_release release;
          sinkhorn_kernels::block_attention_backward(
              a, ptr<const void>(dout), dos.data(), ptr<const float>(lse), ptr<const float>(delta),
              ptr<const int32_t>(readers), ptr<const int32_t>(start), ptr<const int32_t>(count), ptr<void>(dq),
              dqs.data(), ptr<void>(dk), dks.data(), ptr<void>(dv), dvs.data(), ptr<float>(dw), ptr<float>(dnull_k),
              ptr<float>(dnull_v));
        });
}
