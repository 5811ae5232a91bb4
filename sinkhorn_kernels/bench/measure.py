"""Timing and memory of one case. GPU: CUDA events and the allocator's peak; CPU: perf_counter and the process's
peak resident memory (so each CPU case runs in a fresh process, see `isolated`)."""
import json
import resource
import subprocess
import sys
import time

import torch

from .cases import build

MODES = ('fwd', 'fwd+bwd')


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timer(device):
    """A function that runs fn once and returns its time in ms (CUDA events on a GPU)."""
    if device == 'cuda':
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        return run

    def run(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return run


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def measure(op, impl, cfg, device, dtype, warmup, repeats):
    """One row per mode: ms_median, ms_p20, ms_p80, peak_mem_mb, tflops, gbps, tokens_per_s."""
    dtype = getattr(torch, dtype)
    fn, leaves, flops_fwd, io_fwd = build(op, impl, cfg, device, dtype)
    time_ms = timer(device)

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn().float().sum().backward()

    rows = []
    # forward first: on CPU the process's peak only grows, so it is read after the forward-only runs
    for mode, step, flop_factor, io_factor in (('fwd', fwd, 1.0, 1), ('fwd+bwd', fwd_bwd, 3.5, 3)):
        if device == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            step()
        times = [time_ms(step) for _ in range(repeats)]
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == 'cuda' else _peak_rss_mb()
        ms = percentile(times, 0.5)
        # FlashAttention's convention: backward counts 2.5 times the forward's FLOPs
        rows.append(dict(mode=mode, ms_median=ms, ms_p20=percentile(times, 0.2), ms_p80=percentile(times, 0.8),
                         peak_mem_mb=peak, tflops=flop_factor * flops_fwd / ms / 1e9,
                         gbps=io_factor * io_fwd / ms / 1e6, tokens_per_s=cfg['batch'] * cfg['seq_len'] / ms * 1e3))
    return rows


def median_round(runs):
    """One row per mode from several rounds of `measure`: the round with the median time (the lower one of an
    even count), with the largest peak memory of all rounds."""
    rows = []
    for per_round in zip(*runs):
        row = dict(sorted(per_round, key=lambda m: m['ms_median'])[(len(per_round) - 1) // 2])
        row['peak_mem_mb'] = max(m['peak_mem_mb'] for m in per_round)
        rows.append(row)
    return rows


def isolated(spec):
    """Runs `measure(**spec)` in a fresh Python process; returns its rows or raises RuntimeError with its error."""
    proc = subprocess.run([sys.executable, '-m', 'sinkhorn_kernels.bench.worker', json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f'exit {proc.returncode}')
    return json.loads(proc.stdout.strip().splitlines()[-1])
