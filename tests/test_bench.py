"""The benchmark CLI: a smoke run writes the CSV, the summary and the plots; bad input exits with a message."""
import csv
import os

import pytest
import torch

import sinkhorn_kernels
from sinkhorn_kernels.bench.__main__ import main
from sinkhorn_kernels.bench.report import COLUMNS


def test_smoke_run_writes_csv_summary_and_plots(tmp_path):
    out = str(tmp_path / 'bench')
    assert main(['--ops', 'sinkhorn_attention', 'sinkhorn', 'gumbel_sinkhorn', '--seq-lens', '256', '--causal', 'no',
                 '--warmup', '0', '--repeats', '1', '--impls', 'reference', 'sinkhorn_kernels[reference]', '--out',
                 out]) == 0
    rows = list(csv.DictReader(open(os.path.join(out, 'results.csv'))))
    assert {r['op'] for r in rows} == {'sinkhorn_attention', 'sinkhorn', 'gumbel_sinkhorn'}
    assert set(COLUMNS) <= set(rows[0])
    assert rows[0]['timestamp'].endswith('Z') and rows[0]['version'].startswith(sinkhorn_kernels.__version__)
    assert {r['impl'] for r in rows} == {'reference', 'sinkhorn_kernels[reference]'}
    assert {r['mode'] for r in rows} == {'fwd', 'fwd+bwd'}
    assert all(float(r['ms_median']) > 0 and float(r['peak_mem_mb']) > 0 for r in rows)
    summary = open(os.path.join(out, 'summary.md')).read()
    assert 'speedup vs reference' in summary and 'x |' in summary
    assert os.path.exists(os.path.join(out, 'sinkhorn_attention_fwd_bwd.png'))


@pytest.mark.skipif(not sinkhorn_kernels.available_backends()['triton'][0], reason='triton is not available')
def test_gumbel_sinkhorn_case_draws_the_reference_packages_noise():
    """The benchmark compares like with like: under one seed our fused Gumbel-Sinkhorn and the reference
    package's draw the same noise and give the same matrix."""
    from sinkhorn_kernels.bench.cases import build, default_config
    cfg = default_config('gumbel_sinkhorn', 128, 1, 1, 64, 64, False)
    outs = []
    for impl in ('reference', 'sinkhorn_kernels[triton]'):
        fn, *_ = build('gumbel_sinkhorn', impl, cfg, 'cpu', torch.float32)
        torch.manual_seed(3)
        outs.append(fn())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-6)


def test_compile_adds_compiled_variants_of_ours_and_the_reference():
    from sinkhorn_kernels.bench.__main__ import parse_args, plan
    impls = lambda *argv: {i for _, i, _ in plan(*parse_args(['--ops', 'sinkhorn', '--seq-lens', '256', *argv]))}
    assert not any(i.endswith('+compile') for i in impls())
    assert {'sinkhorn_kernels[reference]+compile', 'reference+compile'} <= impls('--compile')
    assert impls('--impls', 'reference', '--compile') == {'reference', 'reference+compile'}
    assert impls('--impls', 'reference+compile') == {'reference+compile'}


def test_a_compiled_case_runs_through_torch_compile():
    from torch._dynamo.utils import counters

    from sinkhorn_kernels.bench.cases import build, default_config
    cfg = default_config('sinkhorn', 128, 1, 1, 64, 64, False)
    eager, *_ = build('sinkhorn', 'sinkhorn_kernels[reference]', cfg, 'cpu', torch.float32)
    compiled, *_ = build('sinkhorn', 'sinkhorn_kernels[reference]+compile', cfg, 'cpu', torch.float32)
    counters.clear()
    eager()
    assert counters['stats']['unique_graphs'] == 0
    torch.testing.assert_close(compiled(), eager())
    assert counters['stats']['unique_graphs'] >= 1


def benchmark_script(name, *args):
    """The output of benchmarks/`name` run with `args` in its own process."""
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', name)
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason='counts through the Triton interpreter')
def test_launch_census_counts_a_layer_step():
    out = benchmark_script('launch_census.py', '--seq-len', '256', '--causal')
    # per group of heads (causal: the rotated and the others; one chunk each, which routes from its own q and k):
    # summaries (two kernels each way), routing and attention, forward and back (with the forward again), the
    # reverse index, and the dK/dV kernel's plan and partial sums
    assert 'ATen ops and 26 Triton launches' in out
    assert 'mm ' in out.splitlines()[1] and '_reverse_index 2' in out.splitlines()[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason='counts through the Triton interpreter')
def test_launch_census_counts_a_sinkhorn_step():
    out = benchmark_script('launch_census.py', '--op', 'sinkhorn', '--matrices', '1').splitlines()
    # the two kernels alone: the ATen ops are the benchmark's .float().sum() and their backward
    assert '4 ATen ops and 2 Triton launches' in out[0]
    assert out[1] == 'ATen: _to_copy 2, sum 1, ones_like 1'


def test_key_block_readers_tabulates_the_longest_dkv_program():
    rows = benchmark_script('key_block_readers.py', '--seq-lens', '2048').splitlines()[2:]
    assert [row.split(' | ')[:2] for row in rows] == [['| 2048', 'False'], ['| 2048', 'True']]
    from sinkhorn_kernels.ops.block_attention.triton import READERS_PER_PROGRAM
    for row in rows:  # mean / max readers, then the longest program unsplit (the max) and split
        mean, busiest = map(float, row.split(' | ')[2].split(' / '))
        unsplit, split = map(int, row.split(' | ')[3].rstrip(' |').split(' / '))
        assert mean <= busiest == unsplit and split <= min(unsplit, 2 * READERS_PER_PROGRAM - 1)


def test_rows_say_when_and_from_which_code_and_older_files_take_the_new_columns(tmp_path):
    from sinkhorn_kernels.bench.report import append_csv, read_csv
    path = str(tmp_path / 'results.csv')
    with open(path, 'w') as f:  # a file from before the timestamp and version columns
        f.write('impl,op,ms_median\nreference,layer,12.5\n')
    append_csv(path, [dict(impl='ours', op='layer', ms_median=6.0, timestamp='2026-12-02T02:00Z', version='0.1.0')])
    old, new = read_csv(path)
    assert list(old) == COLUMNS and (old['impl'], old['ms_median'], old['timestamp']) == ('reference', '12.5', '')
    assert (new['impl'], new['timestamp'], new['version']) == ('ours', '2026-12-02T02:00Z', '0.1.0')


def test_rounds_report_the_median_round_and_the_largest_peak(tmp_path):
    out = str(tmp_path / 'bench')
    assert main(['--ops', 'sinkhorn', '--seq-lens', '256', '--warmup', '0', '--repeats', '1', '--rounds', '3',
                 '--impls', 'sinkhorn_kernels[reference]', '--no-plots', '--out', out]) == 0
    rows = list(csv.DictReader(open(os.path.join(out, 'results.csv'))))
    assert sorted(r['mode'] for r in rows) == ['fwd', 'fwd+bwd']  # one row per mode, not per round


def test_median_round_takes_one_round_time_and_the_largest_peak():
    from sinkhorn_kernels.bench.measure import median_round
    run = lambda ms, mb: [dict(mode='fwd', ms_median=ms, peak_mem_mb=mb, tflops=1 / ms)]
    row, = median_round([run(3.0, 10), run(1.0, 30), run(2.0, 20), run(4.0, 15)])
    assert row == dict(mode='fwd', ms_median=2.0, peak_mem_mb=30, tflops=0.5)


@pytest.mark.parametrize('argv,message', [
    (['--ops', 'nope'], 'invalid choice'),
    (['--seq-lens', '100'], 'not a multiple of the bucket size'),
    (['--ops', 'layer', '--heads', '3'], 'heads * dim_head must equal 512'),
    (['--repeats', '0'], 'must be positive'),
    (['--rounds', '0'], 'must be positive'),
])
def test_bad_input_exits_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ['--out', 'unused'])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_missing_device_exits_with_a_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(['--device', 'cuda'])
    assert e.value.code == 2 and 'no CUDA device' in capsys.readouterr().err
