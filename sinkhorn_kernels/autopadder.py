import torch
import torch.nn.functional as F
from torch import nn

from ._checks import require
from .transformer import SinkhornTransformer, SinkhornTransformerLM


def pad_length(length, multiple):
    return -length % multiple


class Autopadder(nn.Module):
    """Pads the sequence (and the context) to a bucket multiple, masks the padding, and slices it off again."""

    def __init__(self, net, pad_left=False):
        super().__init__()
        require(isinstance(net, (SinkhornTransformer, SinkhornTransformerLM)),
                f'Autopadder wraps a SinkhornTransformer or SinkhornTransformerLM, got {type(net).__name__}')
        self.net, self.pad_left = net, pad_left
        transformer = net.transformer if isinstance(net, SinkhornTransformerLM) else net
        self.bucket_size = transformer.pad_to_bucket_size
        self.context_bucket_size = transformer.context_bucket_size

    def forward(self, x, input_mask=None, context=None, context_mask=None, **kwargs):
        b, t = x.shape[:2]
        padding = pad_length(t, self.bucket_size)
        if padding:
            offset = (padding, 0) if self.pad_left else (0, padding)
            if input_mask is None:
                input_mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
            input_mask = F.pad(input_mask, offset, value=False)
            x = F.pad(x, (0, 0) * (x.dim() - 2) + offset, value=0)
        if context is not None:
            context_padding = pad_length(context.shape[1], self.context_bucket_size)
            if context_padding:
                if context_mask is None:
                    context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
                context_mask = F.pad(context_mask, (0, context_padding), value=False)
                context = F.pad(context, (0, 0, 0, context_padding), value=0)
        out = self.net(x, input_mask=input_mask, context=context, context_mask=context_mask, **kwargs)
        return out[:, padding:] if self.pad_left else out[:, :t]
