"""`python -m sinkhorn_kernels.bench`: sinkhorn-kernels against sinkhorn-transformer 0.11.4 and dense attention.

Writes into --out: results.csv (appended), summary.md, and one PNG per op and mode.
"""
import argparse
import datetime
import os
import subprocess
import sys

import torch

from .cases import COMPILED, OPS, SINKHORN_OPS, default_config, implementations, validate
from .measure import isolated, measure, median_round
from .report import append_csv, plot, read_csv, summary_markdown

# sizes per device: the CPU run finishes in a few minutes on 2 cores; the GPU sweep goes to 64k tokens
DEFAULT_SEQ_LENS = {
    'cpu': {'sinkhorn': [1024, 2048, 4096], 'gumbel_sinkhorn': [1024, 2048, 4096],
            'sinkhorn_attention': [1024, 2048, 4096], 'layer': [1024, 2048, 4096], 'lm': [1024, 2048]},
    'cuda': {'sinkhorn': [1024, 4096, 16384, 65536], 'gumbel_sinkhorn': [1024, 4096, 16384, 65536],
             'sinkhorn_attention': [1024, 4096, 16384, 65536], 'layer': [1024, 4096, 16384, 65536],
             'lm': [1024, 4096, 16384]},
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog='python -m sinkhorn_kernels.bench', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ops', nargs='+', choices=OPS, default=list(OPS), help='what to measure')
    p.add_argument('--seq-lens', nargs='+', type=int, help='sequence lengths (default: chosen per device and op)')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--heads', type=int, default=8)
    p.add_argument('--dim-head', type=int, default=64)
    p.add_argument('--bucket-size', type=int, default=64)
    p.add_argument('--causal', choices=['both', 'yes', 'no'], default='both')
    p.add_argument('--impls', nargs='+', help='only these implementations (names as in the CSV)')
    p.add_argument('--compile', action='store_true',
                   help=f'also measure ours and the reference under torch.compile (names ending in {COMPILED})')
    p.add_argument('--dtype', choices=['float32', 'float16', 'bfloat16'],
                   help='default: float32 on CPU, bfloat16 on CUDA')
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=int, help='untimed runs first (default: 1 on CPU, 5 on CUDA)')
    p.add_argument('--repeats', type=int, help='timed runs; the median is reported (default: 3 on CPU, 20 on CUDA)')
    p.add_argument('--rounds', type=int, default=1,
                   help='measure every case this many times, the cases taking turns, and report the round with the '
                        'median time and the largest peak memory (for machines whose speed drifts)')
    p.add_argument('--out', default='bench-results', help='output folder (default: ./bench-results)')
    p.add_argument('--no-plots', action='store_true')
    args = p.parse_args(argv)

    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda was asked for but no CUDA device is available here; use --device cpu')
    args.dtype = args.dtype or ('bfloat16' if args.device == 'cuda' else 'float32')
    if args.device == 'cpu' and args.dtype != 'float32':
        p.error(f'{args.dtype} is only measured on CUDA; on CPU use --dtype float32')
    on_cpu = args.device == 'cpu'
    args.warmup = (1 if on_cpu else 5) if args.warmup is None else args.warmup
    args.repeats = (3 if on_cpu else 20) if args.repeats is None else args.repeats
    if min(args.repeats, args.rounds, args.batch, args.heads, args.dim_head) < 1 or args.warmup < 0:
        p.error('--repeats, --rounds, --batch, --heads and --dim-head must be positive and --warmup not negative')
    return p, args


def plan(p, args):
    """Every (op, impl, cfg) to measure; an impossible size is a usage error, not a traceback."""
    jobs = []
    causal_values = {'both': (False, True), 'yes': (True,), 'no': (False,)}[args.causal]
    for op in args.ops:
        impls = implementations(op, args.device)
        chosen = args.impls or [i for i in impls if not i.endswith(COMPILED)]
        if args.compile:
            chosen = chosen + [i + COMPILED for i in chosen]
        impls = [i for i in impls if i in chosen]
        for seq_len in args.seq_lens or DEFAULT_SEQ_LENS[args.device][op]:
            # the Sinkhorn ops have no causal variant
            for causal in causal_values if op not in SINKHORN_OPS else (False,):
                cfg = default_config(op, seq_len, args.batch, args.heads, args.dim_head, args.bucket_size, causal)
                problem = validate(op, cfg)
                if problem:
                    p.error(f'{op}: {problem}')
                jobs += [(op, impl, cfg) for impl in impls]
    if not jobs:
        p.error('nothing to measure: no implementation matches --impls ' + ' '.join(args.impls or []))
    return jobs


def code_version():
    """The package's version, and where it runs from a git checkout its commit ('+dirty' with uncommitted
    changes, the results folder aside: runs append to it): the CSV's rows of different code are told apart by
    it."""
    import sinkhorn_kernels
    root = os.path.dirname(os.path.dirname(os.path.abspath(sinkhorn_kernels.__file__)))
    git = lambda *a: subprocess.run(['git', '-C', root, *a], capture_output=True, text=True).stdout.strip()
    try:
        if os.path.realpath(git('rev-parse', '--show-toplevel') or '/nonexistent') != os.path.realpath(root):
            return sinkhorn_kernels.__version__
        changed = git('status', '--porcelain', '--untracked-files=no', '--', '.', ':!benchmarks/results')
        dirty = '+dirty' if changed else ''
        return f'{sinkhorn_kernels.__version__}+g{git("rev-parse", "--short=7", "HEAD")}{dirty}'
    except OSError:  # no git
        return sinkhorn_kernels.__version__


def describe_machine(args, started, version):
    """Date, device, dtype and versions: what a result is only meaningful with."""
    import platform
    if args.device == 'cuda':
        device = torch.cuda.get_device_name()
    else:
        model = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
                     platform.processor()) if os.path.exists('/proc/cpuinfo') else platform.processor()
        device = f'CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads'
    versions = f'torch {torch.__version__}; sinkhorn-kernels {version}'
    return f'{started:%Y-%m-%d %H:%M} UTC; {device}; {args.dtype}; {versions}'


def main(argv=None):
    from tqdm import tqdm

    p, args = parse_args(argv)
    jobs = plan(p, args)
    started, version = datetime.datetime.now(datetime.timezone.utc), code_version()
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, 'results.csv')
    rows, failures = [], []
    runs = [[] for _ in jobs]
    # each round goes over every case in turn, so a drift in the machine's speed reaches every implementation alike
    rounds = [(r, i) for r in range(args.rounds) for i in range(len(jobs))]
    for r, i in tqdm(rounds, desc='benchmarks', unit='case'):
        op, impl, cfg = jobs[i]
        spec = dict(op=op, impl=impl, cfg=cfg, device=args.device, dtype=args.dtype, warmup=args.warmup,
                    repeats=args.repeats)
        try:
            # on CPU the peak resident memory is per process: every case gets a fresh one
            runs[i].append(isolated(spec) if args.device == 'cpu' else measure(**spec))
        except (RuntimeError, torch.OutOfMemoryError) as e:
            which = f' (round {r + 1} of {args.rounds})' if args.rounds > 1 else ''
            failures.append(f'{op} {impl} seq_len={cfg["seq_len"]} causal={cfg["causal"]}{which}: {e}')
            if args.device == 'cuda':
                torch.cuda.empty_cache()
    for (op, impl, cfg), measured in zip(jobs, runs):
        if not measured:
            continue
        new = [dict(impl=impl, op=op, causal=cfg['causal'], seq_len=cfg['seq_len'], batch=cfg['batch'],
                    heads=cfg['heads'], dim_head=cfg['dim_head'], dtype=args.dtype, device=args.device,
                    timestamp=f'{started:%Y-%m-%dT%H:%MZ}', version=version, **m)
               for m in median_round(measured)]
        append_csv(csv_path, new)
        rows += new
    all_rows = read_csv(csv_path) if os.path.exists(csv_path) else []
    with open(os.path.join(args.out, 'summary.md'), 'w') as f:
        # every row of the CSV: runs that share an output folder add up to one summary
        machine = describe_machine(args, started, version)
        f.write(f'# sinkhorn-kernels benchmark\n\n{machine}\n\n' + summary_markdown(all_rows))
        if failures:
            f.write('\n## Not measured\n\n' + ''.join(f'- {x}\n' for x in failures))
    if rows and not args.no_plots:
        plot(all_rows, args.out)
    print(summary_markdown(rows))
    for x in failures:
        print('not measured:', x, file=sys.stderr)
    print(f'results in {args.out}/ (results.csv, summary.md{", plots" if not args.no_plots else ""})')
    return 0 if rows else 1


if __name__ == '__main__':
    sys.exit(main())
