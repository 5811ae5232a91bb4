"""The suite's outputs: one CSV row per measurement, a Markdown summary against the reference, PNG plots."""
import csv
import os
from collections import defaultdict

COLUMNS = ['impl', 'op', 'mode', 'causal', 'seq_len', 'batch', 'heads', 'dim_head', 'dtype', 'device', 'ms_median',
           'ms_p20', 'ms_p80', 'peak_mem_mb', 'tflops', 'gbps', 'tokens_per_s', 'timestamp', 'version']


def append_csv(path, rows):
    """Appends to the CSV (writing the header for a new file), so several runs can share one file. A file of
    older columns is rewritten first, its rows keeping their values and leaving the new columns empty."""
    if os.path.exists(path):
        with open(path, newline='') as f:
            header = next(csv.reader(f), None)
        if header != COLUMNS:
            _write(path, 'w', read_csv(path))
    _write(path, 'a', rows)


def _write(path, mode, rows):
    new = mode == 'w' or not os.path.exists(path)
    with open(path, mode, newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction='ignore')
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _key(row):
    return (row['op'], row['mode'], row['causal'], int(row['seq_len']), row['dtype'], row['device'])


def summary_markdown(rows):
    """Per configuration: time and memory of every implementation, and ours against the reference."""
    groups = defaultdict(dict)
    for r in rows:
        groups[_key(r)][r['impl']] = r
    header = ('op', 'mode', 'causal', 'seq_len', 'impl', 'ms (median)', 'peak MB', 'speedup vs reference',
              'memory vs reference')
    lines = [_table_row(header), _table_row(['---'] * len(header))]
    for key in sorted(groups):
        by_impl = groups[key]
        ref = by_impl.get('reference')
        for impl, r in sorted(by_impl.items()):
            ms, mem = float(r['ms_median']), float(r['peak_mem_mb'])
            speed = f'{float(ref["ms_median"]) / ms:.2f}x' if ref and impl != 'reference' else ''
            memory = f'{mem / float(ref["peak_mem_mb"]):.2f}x' if ref and impl != 'reference' else ''
            lines.append(_table_row([*key[:4], impl, f'{ms:.2f}', f'{mem:.0f}', speed, memory]))
    return '\n'.join(lines) + '\n'


def _table_row(cells):
    return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def plot(rows, out_dir):
    """Time and peak memory against sequence length, log-log, one line per implementation; one PNG per op and
    mode. Returns the files written."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    series = defaultdict(lambda: defaultdict(list))
    for r in rows:
        series[(r['op'], r['mode'])][(r['impl'], r['causal'])].append(
            (int(r['seq_len']), float(r['ms_median']), float(r['peak_mem_mb'])))
    written = []
    for (op, mode), lines in sorted(series.items()):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for (impl, causal), points in sorted(lines.items()):
            points.sort()
            xs = [p[0] for p in points]
            label = f'{impl}{" causal" if causal == "True" else ""}'
            ax_t.plot(xs, [p[1] for p in points], marker='o', label=label)
            ax_m.plot(xs, [p[2] for p in points], marker='o', label=label)
        for ax, ylabel in ((ax_t, 'time (ms, median)'), (ax_m, 'peak memory (MB)')):
            ax.set_xscale('log', base=2)
            ax.set_yscale('log')
            ax.set_xlabel('sequence length')
            ax.set_ylabel(ylabel)
            ax.grid(True, which='both', alpha=0.3)
        ax_t.legend(fontsize=7)
        fig.suptitle(f'{op} ({mode})')
        fig.tight_layout()
        path = os.path.join(out_dir, f'{op}_{mode.replace("+", "_")}.png')
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
