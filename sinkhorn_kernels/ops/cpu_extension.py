"""Access to the compiled extension sinkhorn_kernels._cpu (csrc/*_cpu.cpp, cpu_*.cpp): the module (`extension`, None
when the package was installed without it), and the advice
that puts the fused layer's large buffers on transparent huge pages (csrc/cpu_memory.cpp)."""
import os

from .backends import optional_module

extension = optional_module('sinkhorn_kernels._cpu')
# SINKHORN_KERNELS_HUGE_PAGES=0: the fused layer's buffers stay on the pages the allocator gives
huge_pages = extension is not None and os.environ.get('SINKHORN_KERNELS_HUGE_PAGES', '1') != '0'
# glibc maps a block this large on its own (its largest mmap threshold), so the advice never lands on its heap,
# whose one mapping each advised range would split
HUGE_PAGES_MIN_BYTES = 32 << 20


def on_huge_pages(t):
    """t, its memory (on CPU, not yet written, at least HUGE_PAGES_MIN_BYTES) advised onto transparent huge pages
    where the OS has them for madvise: the first writes then fault once per huge page rather than per 4 KiB page,
    and the GEMMs and kernels that stream the buffer miss the TLB less (~8% of the 16k-token layer's step here)."""
    n = t.numel() * t.element_size()
    if huge_pages and t.is_cpu and n >= HUGE_PAGES_MIN_BYTES:
        extension.advise_huge_pages(t.data_ptr(), n)
    return t
