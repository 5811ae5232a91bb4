// Picks the build of the CPU kernels for the best instruction set this CPU has (one wheel serves every x86-64
// CPU); SINKHORN_KERNELS_CPU_ISA=avx2 or generic picks a lesser one (the tests run every build this way).
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.h"

namespace sinkhorn_kernels::cpu {

#define SK_DECLARE(isa)                                                                         \
  namespace isa {                                                                               \
  void block_attention_forward(const Layout&, const Head*, int64_t, int, float*);               \
  void block_attention_backward(const Layout&, const Head*, int64_t, int, float*);              \
  }
SK_DECLARE(avx512)
SK_DECLARE(avx2)
SK_DECLARE(generic)

namespace {
enum class Isa { avx512, avx2, generic };

Isa best() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::generic;
}

Isa detect() {
  const Isa top = best();
  const char* asked = std::getenv("SINKHORN_KERNELS_CPU_ISA");
  if (asked && std::strcmp(asked, "generic") == 0) return Isa::generic;
  if (asked && std::strcmp(asked, "avx2") == 0 && top != Isa::generic) return Isa::avx2;
  return top;
}
const Isa isa = detect();
}  // namespace

const char* isa_name() { return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "generic"; }

#define SK_DISPATCH(fn)                                                                         \
  void fn(const Layout& lay, const Head* heads, int64_t n, int workers, float* scratch) {       \
    switch (isa) {                                                                              \
      case Isa::avx512: return avx512::fn(lay, heads, n, workers, scratch);                     \
      case Isa::avx2: return avx2::fn(lay, heads, n, workers, scratch);                         \
      default: return generic::fn(lay, heads, n, workers, scratch);                             \
    }                                                                                           \
  }
SK_DISPATCH(block_attention_forward)
SK_DISPATCH(block_attention_backward)

}  // namespace sinkhorn_kernels::cpu
