"""Per-product Python overhead of the curvature engine (issue 16): `HessianOperator.matvec` (mode='rev', single batch, kept
gradient graph) against a bare `torch.autograd.grad` through the same kind of kept graph (gradient built once with
create_graph=True, then one double backward per product), on the digits CNN with 512 images. Also a GGN product.

    nice -n 10 .venv/bin/python bench/bench_overhead.py [--repeat 15] [--small-rounds 1000]

Interleaved rounds (`bench_families.interleaved`): the bare product first, medians of per-round ratios. The overhead is
(median matvec − median bare) / median matvec, and cProfile's top entries of one matvec are printed.

On a shared machine the 512-image ratio moves by several percent from run to run, more than the overhead itself. The
Python overhead does not grow with the batch (the same calls, per product), so it is also measured directly: the same
network on one image, where a product takes about a millisecond, timed in `--small-rounds` interleaved rounds (bare
product, `matvec`); the difference of the medians, in µs, is then divided by the 512-image product's median. Both in
wall-clock time and in CPU time (`time.process_time`, one thread): CPU time leaves out the waits of a loaded machine.
"""
import argparse, cProfile, io, os, pstats, sys
import torch
from torch import nn
sys.path.insert(0, os.path.dirname(__file__))
from common import machine, digits_tensors
from bench_families import interleaved
from fastsprkd.core import HessianOperator, GGNOperator
from fastsprkd.models import DigitsCNN

torch.set_num_threads(1)


def setup(n):
    "The digits CNN on `n` images: `HessianOperator` (rev, kept graph), a vector `v`, and the bare kept-graph product (checked equal)."
    torch.manual_seed(0)
    x, y = digits_tensors(n)
    m = DigitsCNN(32).eval()
    lf = nn.CrossEntropyLoss()
    ps = [p for p in m.parameters()]
    g = torch.autograd.grad(lf(m(x), y), ps, create_graph=True)
    op = HessianOperator(m, lf, (x, y), mode='rev')
    v = torch.randn(op.num_params)
    vs = [t.reshape(p.shape) for t, p in zip(v.split([p.numel() for p in ps]), ps)]
    bare = lambda: torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, ps, vs, retain_graph=True)])
    torch.testing.assert_close(op.matvec(v), bare(), rtol=1e-4, atol=1e-5)
    return op, v, bare


def small_batch_overhead(rounds):
    """Medians of the bare kept-graph product and of `HessianOperator.matvec` on one image, interleaved, in wall-clock and
    in CPU seconds (`time.process_time`: with one thread, the work done, without the waits a loaded machine adds)."""
    import statistics, time
    op, v, bare = setup(1)
    fns = {'bare': bare, 'matvec': lambda: op.matvec(v)}
    ts = {(k, c): [] for k in fns for c in ('wall', 'cpu')}
    for _ in range(rounds):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time(); f()
            ts[k, 'cpu'].append(time.process_time() - c0); ts[k, 'wall'].append(time.perf_counter() - t0)
    return {kc: statistics.median(t) for kc, t in ts.items()}


def cpu_time(f, n):
    "Median CPU seconds of `f()` over `n` calls."
    import statistics, time
    ts = []
    for _ in range(n):
        c0 = time.process_time(); f(); ts.append(time.process_time() - c0)
    return statistics.median(ts)


def main(repeat, small_rounds):
    op, v, bare = setup(512)
    res = interleaved({'bare autograd.grad on a kept graph': bare, 'HessianOperator.matvec (rev, kept graph)': lambda: op.matvec(v)}, repeat)
    (tb, _), (tm, r) = res['bare autograd.grad on a kept graph'], res['HessianOperator.matvec (rev, kept graph)']
    print(f"bare {tb*1e3:.1f} ms, matvec {tm*1e3:.1f} ms, ratio {r:.3f}; overhead {(tm - tb)*1e3:.1f} ms = {(tm - tb)/tm:.1%} of a product")
    tc = cpu_time(lambda: op.matvec(v), repeat)
    t = small_batch_overhead(small_rounds)
    for c, prod in (('wall', tm), ('cpu', tc)):
        o = t['matvec', c] - t['bare', c]
        print(f"one image, {small_rounds} rounds, {c} clock: bare {t['bare', c]*1e6:.0f} µs, matvec {t['matvec', c]*1e6:.0f} µs: "
              f"Python overhead {o*1e6:.0f} µs per product = {o/prod:.2%} of the 512-image product ({prod*1e3:.1f} ms, {c})", flush=True)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(3): op.matvec(v)
    pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats('tottime').print_stats(8); print(s.getvalue()[:3000])


if __name__ == '__main__':
    ap = argparse.ArgumentParser(); ap.add_argument('--repeat', type=int, default=15)
    ap.add_argument('--small-rounds', type=int, default=1000)
    a = ap.parse_args()
    print(machine(), flush=True); main(a.repeat, a.small_rounds)
