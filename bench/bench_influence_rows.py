"""Influence rows −G·S over all 1,797 digits: streaming forward-mode products (`analysis.influence`'s default path) against the
per-sample-gradient rows (the previous implementation, and the fallback path), wall time and peak RSS, each mode in a fresh
process. Usage: python bench/bench_influence_rows.py [--repeat 3] [--tests 1 8]"""
import argparse, json, statistics, subprocess, sys

CHILD = r"""
import json, resource, sys, time, torch
from torch import nn
from fastsprkd.analysis import _influence_rows, _RowStats
from fastsprkd.data import digits_tensors
torch.set_num_threads(1)
mode, T, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x, y = digits_tensors()
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(2048, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
names = [n for n, _ in model.named_parameters()]
P = sum(p.numel() for p in model.parameters())
S = torch.randn(P, T, generator=torch.Generator().manual_seed(0))
dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
times, out = [], None
for _ in range(repeat):
    st = _RowStats() if mode == 'jvp' else _RowStats(path='per-sample gradients', why='benchmark')
    t = time.perf_counter()
    out = torch.cat(list(_influence_rows(model, nn.CrossEntropyLoss(), dl, names, S, stats=st)))
    times.append(time.perf_counter() - t)
    assert st.path == mode
print(json.dumps(dict(times=times, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, params=P,
                      checksum=float(out.double().abs().sum()))))
"""

def run(mode, T, repeat):
    p = subprocess.run([sys.executable, '-c', CHILD, mode, str(T), str(repeat)], capture_output=True, text=True)
    if p.returncode: raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--tests', type=int, nargs='+', default=[1, 8])
    a = ap.parse_args()
    print('| test points | rows by | median s | peak RSS MB |\n|---|---|---|---|')
    for T in a.tests:
        r = {m: run(m, T, a.repeat) for m in ('jvp', 'per-sample gradients')}
        rel = abs(r['jvp']['checksum'] - r['per-sample gradients']['checksum']) / r['per-sample gradients']['checksum']
        for m, v in r.items():
            print(f"| {T} | {m} | {statistics.median(v['times']):.2f} | {v['rss'] / 2**20:.0f} |")
        print(f"<!-- T={T}: {r['jvp']['params']:,} parameters, time ratio per-sample/jvp "
              f"{statistics.median(r['per-sample gradients']['times']) / statistics.median(r['jvp']['times']):.2f}, "
              f"checksum relative difference {rel:.1e} -->")
