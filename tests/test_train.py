"""The training entry point: resume continues the same run, DDP matches one process, bad configurations and
interrupted saves are handled."""
import json
import os
import subprocess
import sys

import pytest
import torch

from sinkhorn_kernels.train.__main__ import main
from sinkhorn_kernels.train import loop

TINY = ['--batch-size', '8', '--dim', '32', '--depth', '1', '--eval-every', '2', '--no-progress']


def params(out):
    return torch.load(os.path.join(out, loop.CHECKPOINT), weights_only=False)['model']


def test_lm_run_writes_metrics_checkpoint_and_plot(tmp_path):
    out = str(tmp_path / 'lm')
    assert main(['--task', 'lm', '--steps', '3', '--seq-len', '64', '--out', out] + TINY) == 0
    metrics = json.load(open(os.path.join(out, 'metrics.json')))
    assert metrics['final']['val_loss'] > 0 and metrics['final']['sample'].startswith('the old sailor')
    assert os.path.getsize(os.path.join(out, 'loss_curve.png')) > 0


def test_resume_continues_the_same_run(tmp_path):
    straight, resumed = str(tmp_path / 'a'), str(tmp_path / 'b')
    assert main(['--task', 'sort', '--steps', '4', '--out', straight] + TINY) == 0
    assert main(['--task', 'sort', '--steps', '2', '--out', resumed] + TINY) == 0
    assert main(['--task', 'sort', '--steps', '4', '--out', resumed, '--resume'] + TINY) == 0
    a, b = params(straight), params(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], msg=name)
    history = torch.load(os.path.join(resumed, loop.CHECKPOINT), weights_only=False)['history']
    assert [h['step'] for h in history if 'train_loss' in h] == [1, 2, 3, 4]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    single, ddp = str(tmp_path / 'single'), str(tmp_path / 'ddp')
    args = ['--task', 'sort', '--steps', '3', '--grad-accum', '2'] + TINY
    assert main(args + ['--out', single]) == 0
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           '-m', 'sinkhorn_kernels.train', *args, '--out', ddp], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.load(open(os.path.join(ddp, 'metrics.json')))
    assert metrics['world_size'] == 2
    first, second = metrics['rank_param_checksums']
    assert first == second  # every rank holds the same parameters
    one, two = params(single), params(ddp)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    loss = lambda out: [h['train_loss'] for h in torch.load(os.path.join(out, loop.CHECKPOINT),
                                                             weights_only=False)['history'] if 'train_loss' in h]
    torch.testing.assert_close(torch.tensor(loss(ddp)), torch.tensor(loss(single)), atol=1e-5, rtol=1e-4)


def test_bad_configurations_get_clear_errors(tmp_path, capsys):
    assert main(['--task', 'sort', '--seq-len', '30', '--out', str(tmp_path / 'x')] + TINY) == 2
    assert 'not a multiple of the bucket size' in capsys.readouterr().err
    assert main(['--task', 'sort', '--resume', '--out', str(tmp_path / 'missing')] + TINY) == 2
    assert 'no checkpoint to resume' in capsys.readouterr().err
    corrupt = tmp_path / 'corrupt'
    corrupt.mkdir()
    (corrupt / loop.CHECKPOINT).write_bytes(b'\x80\x04not a checkpoint')
    assert main(['--task', 'sort', '--resume', '--out', str(corrupt)] + TINY) == 2
    assert 'corrupt' in capsys.readouterr().err


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    loop.save_atomically({'step': 1}, path)

    def crash(obj, f):
        f.write(b'partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        loop.save_atomically({'step': 2}, path)
    assert torch.load(path, weights_only=False) == {'step': 1}
