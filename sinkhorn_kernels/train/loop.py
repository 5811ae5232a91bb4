"""The training loop: one process, or data parallel under torchrun (torch.distributed: gloo on CPU, NCCL on GPU)."""
import contextlib
import json
import math
import os
import time

import torch
import torch.distributed as dist

from .. import set_backend
from .._checks import require
from .tasks import TASKS

CHECKPOINT = 'checkpoint.pt'


def save_atomically(obj, path):
    """Writes next to the target and renames over it: an interrupted save never destroys the previous checkpoint."""
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise ValueError(f'no checkpoint to resume at {path}; train without --resume first, or pass the right --out')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # truncated or foreign files fail in many ways inside the unpickler
        raise ValueError(f'the checkpoint {path} is corrupt or not a sinkhorn-kernels checkpoint ({e}); '
                         'delete it and train from scratch') from e
    require(isinstance(ckpt, dict) and {'step', 'model', 'optimizer', 'config', 'task'} <= set(ckpt),
            f'the checkpoint {path} is not a sinkhorn-kernels training checkpoint; delete it or choose another --out')
    return ckpt


def validate_config(cfg, world):
    require(cfg['seq_len'] % cfg['bucket_size'] == 0,
            f'--seq-len {cfg["seq_len"]} is not a multiple of the bucket size {cfg["bucket_size"]}')
    require(cfg['seq_len'] // cfg['bucket_size'] >= 2, '--seq-len must hold at least two buckets')
    require(cfg['batch_size'] % (world * cfg['grad_accum']) == 0,
            f'--batch-size {cfg["batch_size"]} must divide evenly over {world} processes x {cfg["grad_accum"]} '
            'accumulation steps')
    require(cfg['steps'] >= 1 and cfg['lr'] > 0 and cfg['eval_every'] >= 1,
            '--steps, --lr and --eval-every must be positive')


def learning_rate(cfg, step):
    """Linear warm-up over the first 5% of the steps, then cosine decay to 10%: a function of the step alone, so a
    resumed run follows the same schedule."""
    warmup = max(1, cfg['steps'] // 20)
    if step < warmup:
        return cfg['lr'] * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg['steps'] - warmup)
    return cfg['lr'] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def plot_history(history, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(h['step'], h['train_loss']) for h in history if 'train_loss' in h]
    val = [(h['step'], h['val_loss']) for h in history if 'val_loss' in h]
    if train:
        ax.plot(*zip(*train), label='train loss', alpha=0.6)
    if val:
        ax.plot(*zip(*val), marker='o', label='validation loss')
    ax.set_xlabel('step')
    ax.set_ylabel('cross-entropy')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(cfg, progress=True):
    """Trains cfg['task'] into cfg['out']; returns the final metrics (on every rank)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    device = torch.device(cfg['device'])
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    ckpt = load_checkpoint(os.path.join(cfg['out'], CHECKPOINT)) if cfg['resume'] else None
    if ckpt is not None:
        # the run continues as it was configured; only how far it goes may change
        cfg = {**ckpt['config'], 'steps': cfg['steps'], 'resume': True, 'out': cfg['out'], 'device': cfg['device']}
    validate_config(cfg, world)
    task = TASKS[cfg['task']](cfg)
    if cfg['backend']:
        set_backend(cfg['backend'])

    torch.manual_seed(cfg['seed'])
    model = task.build_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg['lr'], weight_decay=0.01)
    start, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        start, history = ckpt['step'], ckpt['history']
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if cfg['amp'] and device.type == 'cuda'
                else contextlib.nullcontext())
    is_main = rank == 0
    os.makedirs(cfg['out'], exist_ok=True)

    def checkpoint(step):
        if is_main:
            save_atomically(dict(step=step, model=model.state_dict(), optimizer=optimizer.state_dict(), config=cfg,
                                 task=cfg['task'], history=history), os.path.join(cfg['out'], CHECKPOINT))

    def evaluate(step):
        model.eval()
        with torch.no_grad(), autocast:
            metrics = task.evaluate(model, cfg['seed'])
            metrics['sample'] = task.sample(model, cfg['seed'] + step)
        model.train()
        return metrics

    from tqdm import tqdm
    bar = tqdm(range(start, cfg['steps']), initial=start, total=cfg['steps'], desc=cfg['task'],
               disable=not (progress and is_main))
    began = time.time()
    micro = cfg['batch_size'] // (world * cfg['grad_accum'])
    final = None
    for step in bar:
        # the global batch of this step, whatever the number of processes: each takes its rows
        batch = [t[rank::world] for t in task.batch(cfg['seed'], step)]
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group['lr'] = learning_rate(cfg, step)
        total = 0.
        for i in range(cfg['grad_accum']):
            part = [t[i * micro:(i + 1) * micro].to(device) for t in batch]
            sync = contextlib.nullcontext() if i == cfg['grad_accum'] - 1 or world == 1 else ddp.no_sync()
            with sync, autocast:
                loss = task.loss(ddp, part) / cfg['grad_accum']
            loss.backward()
            total += loss.item()
        if cfg['clip'] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['clip'])
        optimizer.step()
        if world > 1:
            mean = torch.tensor([total], device=device)
            dist.all_reduce(mean)
            total = mean.item() / world
        history.append({'step': step + 1, 'train_loss': total})
        bar.set_postfix(loss=f'{total:.3f}')
        done = step + 1
        if done % cfg['eval_every'] == 0 or done == cfg['steps']:
            metrics = evaluate(done)
            history.append({'step': done, **{k: v for k, v in metrics.items() if k != 'sample'}})
            if is_main:
                bar.write(f'step {done}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items() if k != 'sample'))
                bar.write(f'  sample: {metrics["sample"]!r}')
            checkpoint(done)
            final = metrics
    bar.close()

    if final is None:  # resumed with no step left: the saved checkpoint is already the last one
        final = evaluate(cfg['steps'])
    result = dict(task=cfg['task'], steps=cfg['steps'], world_size=world, train_seconds=time.time() - began,
                  final=final, config={k: v for k, v in cfg.items() if k != 'resume'})
    if world > 1:
        # every rank must hold the same parameters after training
        checksum = torch.tensor([sum(p.double().sum().item() for p in model.parameters())], device=device)
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        result['rank_param_checksums'] = [g.item() for g in gathered]
    if is_main:
        with open(os.path.join(cfg['out'], 'metrics.json'), 'w') as f:
            json.dump(result, f, indent=2)
        plot_history(history, os.path.join(cfg['out'], 'loss_curve.png'))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    set_backend(None)
    return result
