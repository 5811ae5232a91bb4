"""Running a stack of (f, g) residual pairs: plain, or reversible (RevNet) with activations recomputed in
backward. Random state is recorded for every block in training and in eval alike, so dropout and Gumbel
noise replay exactly and backward works in eval mode too (the reference records it only in training)."""
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import get_device_states, set_device_states


class RngState:
    def __init__(self, x):
        self.cpu = torch.get_rng_state()
        self.devices, self.states = get_device_states(x) if x.is_cuda else ([], [])

    @contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            if self.devices:
                set_device_states(self.devices, self.states)
            yield


def layer_drop(pairs, prob):
    """LayerDrop: each (f, g) pair is skipped with probability `prob`; at least the first one stays."""
    keep = [p for p, r in zip(pairs, torch.rand(len(pairs)).tolist()) if r >= prob]
    return keep or pairs[:1]


def run_sequential(x, pairs):
    for (f, g), kwargs in pairs:
        x = x + f(x, **kwargs)
        x = x + g(x)
    return x


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pairs):
        x1, x2 = x.chunk(2, dim=-1)
        ctx.rng = []
        with torch.no_grad():
            for (f, g), kwargs in pairs:
                rng_f = RngState(x)
                x1 = x1 + f(x2, **kwargs)
                rng_g = RngState(x)
                x2 = x2 + g(x1)
                ctx.rng.append((rng_f, rng_g))
        y = torch.cat((x1, x2), dim=-1)
        ctx.y, ctx.pairs = y.detach(), pairs
        return y

    @staticmethod
    def backward(ctx, dy):
        y1, y2 = ctx.y.chunk(2, dim=-1)
        dy1, dy2 = dy.chunk(2, dim=-1)
        for ((f, g), kwargs), (rng_f, rng_g) in zip(reversed(ctx.pairs), reversed(ctx.rng)):
            with torch.enable_grad(), rng_g.replay():
                y1 = y1.detach().requires_grad_()
                gy1 = g(y1)
                torch.autograd.backward(gy1, dy2)
            with torch.no_grad():
                x2 = y2 - gy1
                dx1 = dy1 + y1.grad
            with torch.enable_grad(), rng_f.replay():
                x2 = x2.detach().requires_grad_()
                fx2 = f(x2, **kwargs)
                # keep the graph: context tensors from an encoder are shared by every layer
                torch.autograd.backward(fx2, dx1, retain_graph=True)
            with torch.no_grad():
                y1, y2 = y1 - fx2, x2
                dy1, dy2 = dx1, dy2 + x2.grad
        return torch.cat((dy1, dy2), dim=-1), None


def run_reversible(x, pairs):
    y = _ReversibleFunction.apply(torch.cat((x, x), dim=-1), pairs)
    y1, y2 = y.chunk(2, dim=-1)
    return y1 + y2
