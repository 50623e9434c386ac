"""Overhead of the observer callbacks (issue 5) on digits training; medians over interleaved runs.

    .venv/bin/python bench/bench_callbacks.py [spectrum|sharpness|variants|all] [runs] [threads]

spectrum:  time per epoch of DigitsCNN(16) on the digits (bs 64, 22 steps/epoch, Adam, 3 epochs)
           with HessianSpectrumCallback() at its defaults vs the same training without it.
sharpness: time per training step with SharpnessCallback() (every step) vs without (1 epoch).
variants:  the spectrum overhead for other settings (what the defaults trade).
Plain and observed runs alternate, so that a change of machine load hits both. Both wall time and the
process's CPU time are reported: on a shared machine the CPU time (with 1 thread) is the robust figure.
The DataLoaders use num_workers=0, so that all the work is in this process and counted by its CPU time.
"""
import sys, time, statistics, warnings
import torch
warnings.filterwarnings('ignore')
from fastai.basics import Learner, CrossEntropyLossFlat, accuracy, set_seed
from fastsprkd.data import digits_dls
from fastsprkd.models import DigitsCNN
from fastsprkd.callback.observe import HessianSpectrumCallback, SharpnessCallback

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else min(2, torch.get_num_threads()))
DLS = digits_dls(bs=64, num_workers=0)


def fit_time(cbs, n_epoch):
    set_seed(0)
    learn = Learner(DLS, DigitsCNN(16), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    t0, c0 = time.perf_counter(), time.process_time()
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, 1e-2)
    return time.perf_counter() - t0, time.process_time() - c0


def compare(make_cb, n_epoch, runs):
    "Median (wall, CPU) times of plain and observed fits (alternating) and the observer's rows of its last run."
    fit_time([], 1); fit_time([make_cb()], 1)  # warm-up (first-call costs of torch and fastai)
    plain, observed, rows = [], [], None
    for _ in range(runs):
        plain.append(fit_time([], n_epoch))
        cb = make_cb()
        observed.append(fit_time([cb], n_epoch))
        rows = cb.history
    med = lambda ts, i: statistics.median(t[i] for t in ts)
    return (med(plain, 0), med(plain, 1)), (med(observed, 0), med(observed, 1)), rows


def bench_spectrum(runs, **kwargs):
    n_epoch = 3
    (tp, cp), (to, co), rows = compare(lambda: HessianSpectrumCallback(**kwargs), n_epoch, runs)
    per = [r['seconds'] for r in rows]
    mv = [r['num_matvecs'] for r in rows]
    print(f"HessianSpectrumCallback({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): epoch wall {tp/n_epoch*1e3:.0f} ms plain, "
          f"{to/n_epoch*1e3:.0f} ms observed: overhead {100*(to-tp)/tp:.0f}%; epoch CPU {cp/n_epoch*1e3:.0f} ms plain, "
          f"{co/n_epoch*1e3:.0f} ms observed: overhead {100*(co-cp)/cp:.0f}%; per measurement (wall) "
          f"{[round(s*1e3) for s in per]} ms, {mv} Hessian-vector products")


def bench_sharpness(runs):
    (tp, cp), (to, co), rows = compare(lambda: SharpnessCallback(), 1, runs)
    n = len(rows)
    print(f"SharpnessCallback(): {n} steps (1 epoch incl. validation), per step wall {tp/n*1e3:.1f} ms plain, {to/n*1e3:.1f} ms "
          f"observed: overhead {(to-tp)/tp:.2f}x; CPU {cp/n*1e3:.1f} ms plain, {co/n*1e3:.1f} ms observed: overhead {(co-cp)/cp:.2f}x "
          f"(median measurement {statistics.median(r['seconds'] for r in rows)*1e3:.1f} ms wall)")


if __name__ == '__main__':
    what = sys.argv[1] if len(sys.argv) > 1 else 'all'
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {runs} runs")
    if what in ('spectrum', 'all'): bench_spectrum(runs)
    if what in ('sharpness', 'all'): bench_sharpness(runs)
    if what in ('variants', 'all'):
        for kw in [dict(trace=False), dict(trace_matvecs=12), dict(n_probe=64), dict(n_probe=64, trace=False),
                   dict(warm_start=False), dict(mode='auto')]:
            bench_spectrum(runs, **kw)
