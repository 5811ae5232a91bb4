"""The two built-in tasks. Every batch is a pure function of (seed, step), so a resumed run sees the same data."""
import random

import torch
import torch.nn.functional as F
from torch import nn

from ..autoregressive import AutoregressiveWrapper
from ..transformer import SinkhornTransformer, SinkhornTransformerLM

SUBJECTS = ['the cat', 'a dog', 'the old sailor', 'my sister', 'the tired baker', 'a small bird', 'the teacher',
            'our neighbour', 'the king', 'a young fox']
VERBS = ['sees', 'finds', 'paints', 'carries', 'follows', 'counts', 'hides', 'sells', 'loves', 'builds']
OBJECTS = ['the red box', 'seven apples', 'a wooden boat', 'the bright moon', 'three keys', 'an empty cup',
           'the long road', 'a green hat', 'twelve stones', 'the quiet river']
PLACES = ['in the morning', 'near the sea', 'after dinner', 'at the market', 'in the rain', 'before the storm']


def generated_corpus(n_sentences=20000, seed=0):
    """A text with learnable structure (a small grammar and a counting rule), generated, so nothing is downloaded."""
    rng = random.Random(seed)
    out = []
    for i in range(n_sentences):
        s = f'{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}'
        if rng.random() < 0.5:
            s += f' {rng.choice(PLACES)}'
        out.append(f'{s}. line {i % 100}.\n' if rng.random() < 0.2 else f'{s}.\n')
    return ''.join(out)


def batch_generator(seed, step):
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class CharLM:
    """Character-level causal language modelling on the generated corpus, with samples during training."""
    name = 'lm'
    defaults = dict(seq_len=128, batch_size=16, steps=600, lr=2e-3, dim=128, depth=2, heads=4, bucket_size=16,
                    eval_every=100, eval_batches=8)

    def __init__(self, cfg):
        text = generated_corpus()
        self.vocab = sorted(set(text))
        data = torch.tensor([self.vocab.index(c) for c in text], dtype=torch.long)
        split = int(0.9 * len(data))
        self.train_data, self.val_data = data[:split], data[split:]
        self.cfg = cfg

    def build_model(self):
        c = self.cfg
        lm = SinkhornTransformerLM(num_tokens=len(self.vocab), dim=c['dim'], depth=c['depth'], heads=c['heads'],
                                   max_seq_len=c['seq_len'], bucket_size=c['bucket_size'], causal=True,
                                   n_top_buckets=2)
        return AutoregressiveWrapper(lm)

    def _windows(self, data, gen, n):
        starts = torch.randint(0, len(data) - self.cfg['seq_len'] - 1, (n,), generator=gen)
        return torch.stack([data[s:s + self.cfg['seq_len'] + 1] for s in starts.tolist()])

    def batch(self, seed, step):
        return (self._windows(self.train_data, batch_generator(seed, step), self.cfg['batch_size']),)

    def loss(self, model, batch):
        return model(batch[0], return_loss=True)

    def evaluate(self, model, seed):
        gen = torch.Generator().manual_seed(seed + 12345)
        device = next(model.parameters()).device
        losses = [self.loss(model, (self._windows(self.val_data, gen, self.cfg['batch_size']).to(device),)).item()
                  for _ in range(self.cfg['eval_batches'])]
        return {'val_loss': sum(losses) / len(losses)}

    def sample(self, model, seed):
        prime = 'the old sailor '
        device = next(model.parameters()).device
        start = torch.tensor([self.vocab.index(c) for c in prime], device=device)
        torch.manual_seed(seed)
        out = model.generate(start, 80, temperature=0.8)
        return prime + ''.join(self.vocab[i] for i in out.tolist())


class SortNet(nn.Module):
    """Encoder over the digits; causal decoder over the sorted digits attending to it."""

    def __init__(self, digits, seq_len, dim, depth, heads, bucket_size):
        super().__init__()
        self.bos = digits
        self.src_emb = nn.Embedding(digits, dim)
        self.src_pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        # n_top_buckets = all other buckets: sorting needs every digit's count
        n_top = seq_len // bucket_size - 1
        self.encoder = SinkhornTransformer(dim, depth, max_seq_len=seq_len, heads=heads, bucket_size=bucket_size,
                                           non_permutative=True, n_top_buckets=n_top)
        self.decoder = SinkhornTransformerLM(num_tokens=digits + 1, dim=dim, depth=depth, heads=heads,
                                             max_seq_len=seq_len, bucket_size=bucket_size, causal=True,
                                             receives_context=True, n_top_buckets=n_top)

    def forward(self, src, tgt_in):
        context = self.encoder(self.src_emb(src) + self.src_pos)
        return self.decoder(tgt_in, context=context)

    @torch.no_grad()
    def greedy(self, src):
        context = self.encoder(self.src_emb(src) + self.src_pos)
        out = torch.full((src.shape[0], 1), self.bos, dtype=torch.long, device=src.device)
        t = src.shape[1]
        for i in range(t):
            # the decoder needs whole buckets: pad the prefix with BOS, read the logits at position i
            padded = F.pad(out, (0, t - out.shape[1]), value=self.bos)
            next_tok = self.decoder(padded, context=context)[:, i, :self.bos].argmax(-1, keepdim=True)
            out = torch.cat((out, next_tok), dim=1)
        return out[:, 1:]


class SortDigits:
    """The paper's algorithmic task: sort a sequence of digits (encoder-decoder), greedy-decoded accuracy."""
    name = 'sort'
    defaults = dict(seq_len=32, batch_size=64, steps=1200, lr=1e-3, dim=64, depth=2, heads=4, bucket_size=8,
                    eval_every=250, eval_batches=4, digits=10)

    def __init__(self, cfg):
        self.cfg = cfg

    def build_model(self):
        c = self.cfg
        return SortNet(c['digits'], c['seq_len'], c['dim'], c['depth'], c['heads'], c['bucket_size'])

    def _examples(self, gen, n):
        src = torch.randint(0, self.cfg['digits'], (n, self.cfg['seq_len']), generator=gen)
        return src, src.sort(dim=1).values

    def batch(self, seed, step):
        return self._examples(batch_generator(seed, step), self.cfg['batch_size'])

    def loss(self, model, batch):
        src, tgt = batch
        tgt_in = F.pad(tgt[:, :-1], (1, 0), value=self.cfg['digits'])
        logits = model(src, tgt_in)
        return F.cross_entropy(logits.transpose(1, 2), tgt)

    def evaluate(self, model, seed):
        gen = torch.Generator().manual_seed(seed + 12345)
        device = next(model.parameters()).device
        losses, correct, exact, total = [], 0, 0, 0
        for _ in range(self.cfg['eval_batches']):
            src, tgt = (t.to(device) for t in self._examples(gen, self.cfg['batch_size']))
            losses.append(self.loss(model, (src, tgt)).item())
            pred = model.greedy(src)
            correct += (pred == tgt).sum().item()
            exact += (pred == tgt).all(dim=1).sum().item()
            total += src.shape[0]
        return {'val_loss': sum(losses) / len(losses), 'token_accuracy': correct / (total * self.cfg['seq_len']),
                'exact_match': exact / total}

    def sample(self, model, seed):
        src, tgt = self._examples(torch.Generator().manual_seed(seed), 1)
        pred = model.greedy(src.to(next(model.parameters()).device))
        return f'{src[0].tolist()} -> {pred[0].tolist()}'


TASKS = {task.name: task for task in (CharLM, SortDigits)}
