// sinkhorn_kernels._cpu: the CPU kernels for Python. A head is a dict of pointers (ints) and row strides (in
// elements); absent keys are null / 0. No torch types cross this boundary.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "cpu_kernels.h"

namespace py = pybind11;
using namespace sinkhorn_kernels::cpu;

namespace {

template <typename T> T* ptr(const py::dict& d, const char* key) {
  return d.contains(key) ? reinterpret_cast<T*>(d[key].cast<uintptr_t>()) : nullptr;
}
int64_t num(const py::dict& d, const char* key) { return d.contains(key) ? d[key].cast<int64_t>() : 0; }

Head head_from(const py::dict& d) {
  Head h{};
  h.q = ptr<const float>(d, "q");
  h.k = ptr<const float>(d, "k");
  h.v = ptr<const float>(d, "v");
  h.q_rs = num(d, "q_rs");
  h.k_rs = num(d, "k_rs");
  h.v_rs = num(d, "v_rs");
  h.idx = ptr<const int64_t>(d, "idx");
  h.w = ptr<const float>(d, "w");
  h.null_k = ptr<const float>(d, "null_k");
  h.null_v = ptr<const float>(d, "null_v");
  h.q_mask = ptr<const uint8_t>(d, "q_mask");
  h.kv_mask = ptr<const uint8_t>(d, "kv_mask");
  h.rotated = num(d, "rotated") != 0;
  h.out = ptr<float>(d, "out");
  h.out_rs = num(d, "out_rs");
  h.dout = ptr<const float>(d, "dout");
  h.dout_rs = num(d, "dout_rs");
  h.dq = ptr<float>(d, "dq");
  h.dk = ptr<float>(d, "dk");
  h.dv = ptr<float>(d, "dv");
  h.dq_rs = num(d, "dq_rs");
  h.dk_rs = num(d, "dk_rs");
  h.dv_rs = num(d, "dv_rs");
  h.dw = ptr<float>(d, "dw");
  h.dnull_k = ptr<float>(d, "dnull_k");
  h.dnull_v = ptr<float>(d, "dnull_v");
  return h;
}

Layout layout_from(const py::dict& d) {
  return {num(d, "Nq"), num(d, "bs"), num(d, "Nk"), num(d, "kbs"), num(d, "R"), num(d, "D"), num(d, "causal") != 0,
          d["scale"].cast<float>()};
}

template <typename F>
void call(F kernel, const py::dict& layout, const py::list& heads, int n_workers, uintptr_t scratch) {
  const Layout lay = layout_from(layout);
  std::vector<Head> hs;
  for (const auto& h : heads) hs.push_back(head_from(h.cast<py::dict>()));
  py::gil_scoped_release release;
  kernel(lay, hs.data(), static_cast<int64_t>(hs.size()), n_workers, reinterpret_cast<float*>(scratch));
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "CPU kernels of sinkhorn-kernels (fp32, raw pointers, no libtorch)";
  m.attr("isa") = isa_name();
  m.attr("vector_floats") = kVectorFloats;
  m.def("scratch_floats", [](const py::dict& lay, bool backward, int n_workers) {
    return scratch_floats(layout_from(lay), backward, n_workers);
  });
  m.def("block_attention_forward", [](const py::dict& lay, const py::list& heads, int n_workers, uintptr_t scratch) {
    call(block_attention_forward, lay, heads, n_workers, scratch);
  });
  m.def("block_attention_backward", [](const py::dict& lay, const py::list& heads, int n_workers, uintptr_t scratch) {
    call(block_attention_backward, lay, heads, n_workers, scratch);
  });
  m.def("advise_huge_pages",
        [](uintptr_t p, size_t bytes) { return advise_huge_pages(reinterpret_cast<void*>(p), bytes); });
}
