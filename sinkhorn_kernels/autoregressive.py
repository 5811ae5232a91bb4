"""AutoregressiveWrapper: shifted next-token loss and sampling for a SinkhornTransformerLM."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ._checks import require
from .autopadder import Autopadder
from .transformer import SinkhornTransformerLM


def top_p(logits, thres=0.9):
    """Nucleus filtering with the reference's convention: keeps the most probable tokens until their cumulative
    probability exceeds 1 - thres."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = F.pad(cum_probs > (1 - thres), (1, -1), value=False)
    sorted_logits = sorted_logits.masked_fill(remove, float('-inf'))
    return sorted_logits.scatter(1, sorted_indices, sorted_logits)


def top_k(logits, thres=0.9):
    """Keeps the (1 - thres) fraction of most probable tokens (at least one)."""
    k = max(1, int((1 - thres) * logits.shape[-1]))
    val, ind = torch.topk(logits, k)
    return torch.full_like(logits, float('-inf')).scatter(1, ind, val)


def pad_left(seqs, value):
    longest = max(len(s) for s in seqs)
    return torch.stack([F.pad(s, (longest - len(s), 0), value=value) for s in seqs])


def random_truncate_inputs(inputs, mask=None, pad_value=0):
    """Keeps a random prefix (at least 2 tokens) of each sequence, left-padded; the caller's mask is kept."""
    b, t = inputs.shape
    mask = torch.ones_like(inputs, dtype=torch.bool) if mask is None else mask
    lengths = torch.randint(2, t, (b, 1))
    keep = (torch.arange(t) < lengths).to(inputs.device)
    seqs = [row[k] for row, k in zip(inputs, keep)]
    masks = [row[k] for row, k in zip(mask, keep)]
    return pad_left(seqs, pad_value), pad_left(masks, False)


class AutoregressiveWrapper(nn.Module):
    def __init__(self, net, ignore_index=None, pad_value=0, pad_left=True):
        super().__init__()
        require(isinstance(net, SinkhornTransformerLM),
                f'AutoregressiveWrapper wraps a SinkhornTransformerLM, got {type(net).__name__}')
        self.pad_value = pad_value
        self.ignore_index = pad_value if ignore_index is None else ignore_index
        self.net = Autopadder(net, pad_left=pad_left)
        self.max_seq_len = net.max_seq_len

    @torch.no_grad()
    def generate(self, start_tokens, seq_len, eos_token=None, temperature=1., filter_logits_fn=top_k,
                 filter_thres=0.9, **kwargs):
        require(temperature > 0, f'temperature must be > 0, got {temperature}')
        was_training = self.net.training
        single = start_tokens.dim() == 1
        out = start_tokens[None] if single else start_tokens
        t = out.shape[1]
        input_mask = kwargs.pop('input_mask', None)
        if input_mask is None:
            input_mask = torch.ones_like(out, dtype=torch.bool)
        self.net.eval()
        for _ in range(seq_len):
            x, input_mask = out[:, -self.max_seq_len:], input_mask[:, -self.max_seq_len:]
            logits = self.net(x, input_mask=input_mask, **kwargs)[:, -1]
            probs = (filter_logits_fn(logits, thres=filter_thres) / temperature).softmax(dim=-1)
            sample = torch.multinomial(probs, 1)
            out = torch.cat((out, sample), dim=-1)
            input_mask = F.pad(input_mask, (0, 1), value=True)
            if eos_token is not None and (sample == eos_token).all():
                break
        self.net.train(was_training)
        out = out[:, t:]
        return out[0] if single else out

    def forward(self, x, return_loss=False, randomly_truncate_sequence=False, **kwargs):
        pad = lambda seqs: pad_sequence(seqs, batch_first=True, padding_value=self.pad_value)
        if not return_loss:
            return self.net(x if isinstance(x, torch.Tensor) else pad(x), **kwargs)
        mask = kwargs.pop('input_mask', None)
        if randomly_truncate_sequence:
            x, mask = random_truncate_inputs(x, mask, pad_value=self.pad_value)
        if isinstance(x, torch.Tensor):
            xi, xo = x[:, :-1], x[:, 1:]
        else:
            xi, xo = pad([s[:-1] for s in x]), pad([s[1:] for s in x])
        if mask is not None:
            require(mask.shape == x.shape[:2],
                    f'input_mask must have the shape of the input {tuple(x.shape[:2])}, got {tuple(mask.shape)}')
            kwargs['input_mask'] = mask[:, :-1]
        out = self.net(xi, **kwargs)
        return F.cross_entropy(out.transpose(1, 2), xo, ignore_index=self.ignore_index)
