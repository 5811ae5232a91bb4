"""Allocation of kernel outputs. Tests set FILL to NaN, so an output element that a kernel forgets to write fails
(integer outputs, which hold no NaN, get their type's minimum: no valid index)."""
import torch

FILL = None


def new_output(t):
    if FILL is None:
        return t
    return t.fill_(FILL if t.is_floating_point() else torch.iinfo(t.dtype).min)


def carve(flat, shapes):
    """Contiguous tensors of the given shapes, one after the other in the 1-D tensor `flat`: buffers that live
    together take one allocation, which goes back to the system whole."""
    views, at = [], 0
    for shape in shapes:
        n = torch.Size(shape).numel()
        views.append(flat[at:at + n].view(shape))
        at += n
    return views
