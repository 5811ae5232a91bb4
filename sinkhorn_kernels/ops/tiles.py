"""Tile and grid sizes for the Triton launchers, in plain integer arithmetic: `triton.next_power_of_2` and
`triton.cdiv` are constexpr functions (Triton 3.9) whose wrapper costs about 1.9 us a host call, 25 times the
arithmetic, and a 16k-token layer step makes some 280 such calls."""


def next_power_of_2(n):
    """The least power of two >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()


def cdiv(a, b):
    return -(-a // b)


def dot_tile(n):
    """A tile of at least n that `tl.dot` takes: a power of two, 16 at least."""
    return max(16, next_power_of_2(n))
