// Memory advice for the CPU path's large buffers.
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "cpu_kernels.h"

namespace sinkhorn_kernels::cpu {

bool advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // madvise takes whole pages: the ones inside the buffer (the kernel backs each aligned huge page among them)
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE)), at = reinterpret_cast<uintptr_t>(p);
  const uintptr_t first = (at + page - 1) / page * page, end = (at + bytes) / page * page;
  return end > first && madvise(reinterpret_cast<void*>(first), end - first, MADV_HUGEPAGE) == 0;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

}  // namespace sinkhorn_kernels::cpu
