"""`python -m sinkhorn_kernels.train --task lm|sort [--out DIR]`: train a built-in task (no download needed).

Writes into --out: checkpoint.pt (resume with --resume), metrics.json, loss_curve.png. Under
`torchrun --nproc_per_node N` it trains data parallel (gloo on CPU, NCCL on GPU) with the same global batch.
"""
import argparse
import sys

import torch

from .loop import train
from .tasks import TASKS


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m sinkhorn_kernels.train', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', choices=sorted(TASKS), required=True)
    p.add_argument('--out', help='output folder (default: ./train-<task>)')
    p.add_argument('--resume', action='store_true', help='continue the run saved in --out')
    for name in ('steps', 'batch_size', 'seq_len', 'eval_every', 'dim', 'depth', 'heads', 'bucket_size'):
        p.add_argument('--' + name.replace('_', '-'), type=int, help='default: set by the task')
    p.add_argument('--lr', type=float, help='default: set by the task')
    p.add_argument('--grad-accum', type=int, default=1, help='micro-batches per optimizer step')
    p.add_argument('--clip', type=float, default=1.0, help='gradient norm clipping (0: off)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=True, help='bf16 autocast on CUDA')
    p.add_argument('--backend', choices=['reference', 'triton', 'cuda'], help='default: automatic per device')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error('--device cuda was asked for but no CUDA device is available here')
    task = TASKS[args.task]
    cfg = dict(task.defaults, task=args.task, out=args.out or f'train-{args.task}', resume=args.resume,
               grad_accum=args.grad_accum, clip=args.clip, seed=args.seed, device=args.device, amp=args.amp,
               backend=args.backend)
    cfg.update({k: v for k, v in vars(args).items() if k in task.defaults and v is not None})
    try:
        result = train(cfg, progress=not args.no_progress)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if int(__import__('os').environ.get('RANK', '0')) == 0:
        print('final:', {k: v for k, v in result['final'].items() if k != 'sample'})
    return 0


if __name__ == '__main__':
    sys.exit(main())
