"""FlashAttention's rule, which every kernel suite holds its low-precision results to."""


def assert_within_rule(ours, low, exact, name, slack=0.0):
    """`ours`' error against `exact` (float64) is at most twice that of `low`, the same computation by the
    reference or plain PyTorch in ours' precision, plus `slack` (for errors that are zero, or a few units in the
    last place apart)."""
    err = (ours.double() - exact).abs().max().item()
    base = (low.double() - exact).abs().max().item()
    assert err <= 2 * base + slack, f'{name}: error {err:.3g} against float64 > 2 x {base:.3g} + {slack:.3g}'
