"""Allocation of kernel outputs. Tests set FILL to NaN, so an output element that a kernel forgets to write fails."""
FILL = None


def new_output(t):
    return t if FILL is None else t.fill_(FILL)
