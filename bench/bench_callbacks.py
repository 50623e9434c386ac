"""Overhead of the observer callbacks (issue 5) on digits training; medians over interleaved runs.

    .venv/bin/python bench/bench_callbacks.py [spectrum|sharpness|accuracy|variants|all] [runs] [threads]

spectrum:  time per epoch of DigitsCNN(16) on the digits (bs 64, 22 steps/epoch, Adam) with HessianSpectrumCallback()
           at its defaults (time budget 0.1, one forced measurement at the end of the first epoch) vs the same training
           without it, for fits of 3, 10 and 30 epochs.
sharpness: time per training step with SharpnessCallback() (every step) vs without (1 epoch).
accuracy:  the default measurement (tol=1e-2, ncv=10, 12 trace products) against a tight one (tol=1e-6; trace from
           Hutch++ with 300 products) on the same probe set and parameters, after 3 epochs.
variants:  the spectrum overhead of fixed schedules (what the budget avoids): every epoch end, at the defaults' accuracy.
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
from fastsprkd.eigen import eigsh
from fastsprkd.estimators import trace as trace_estimate
from fastsprkd.callback.observe import HessianSpectrumCallback, SharpnessCallback

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
DLS = digits_dls(bs=64, num_workers=0)


def fit_time(cbs, n_epoch, learn_out=None):
    set_seed(0)
    learn = Learner(DLS, DigitsCNN(16), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    t0, c0 = time.perf_counter(), time.process_time()
    with learn.no_bar(), learn.no_logging(): learn.fit(n_epoch, 1e-2)
    if learn_out is not None: learn_out.append(learn)
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


def bench_spectrum(runs, n_epoch=3, **kwargs):
    (tp, cp), (to, co), rows = compare(lambda: HessianSpectrumCallback(**kwargs), n_epoch, runs)
    per = [r['seconds'] for r in rows]
    mv = [r['num_matvecs'] for r in rows]
    print(f"HessianSpectrumCallback({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}), {n_epoch} epochs: epoch wall "
          f"{tp/n_epoch*1e3:.0f} ms plain, {to/n_epoch*1e3:.0f} ms observed: overhead {100*(to-tp)/tp:.0f}%; epoch CPU "
          f"{cp/n_epoch*1e3:.0f} ms plain, {co/n_epoch*1e3:.0f} ms observed: overhead {100*(co-cp)/cp:.0f}%; "
          f"{len(rows)} measurements at steps {[r['step'] for r in rows]}, (wall) {[round(s*1e3) for s in per]} ms, "
          f"{mv} Hessian-vector products")


def bench_sharpness(runs):
    (tp, cp), (to, co), rows = compare(lambda: SharpnessCallback(), 1, runs)
    n = len(rows)
    print(f"SharpnessCallback(): {n} steps (1 epoch incl. validation), per step wall {tp/n*1e3:.1f} ms plain, {to/n*1e3:.1f} ms "
          f"observed: overhead {(to-tp)/tp:.2f}x; CPU {cp/n*1e3:.1f} ms plain, {co/n*1e3:.1f} ms observed: overhead {(co-cp)/cp:.2f}x "
          f"(median measurement {statistics.median(r['seconds'] for r in rows)*1e3:.1f} ms wall)")


def bench_accuracy():
    "Default measurement vs a tight reference at the same parameters and probe set (after 3 epochs)."
    cb, out = HessianSpectrumCallback(), []
    fit_time([cb], 3, out)
    learn = out[0]
    learn.add_cb(cb)  # cb.measure reads the learner
    row = cb.measure()  # at the defaults (warm-started from the fit's measurements)
    op = cb._op
    ref = eigsh(op, 2, 'BE', tol=1e-6, max_matvecs=1000)
    lo, hi = float(ref.eigenvalues.min()), float(ref.eigenvalues.max())
    tr = trace_estimate(op, num_matvecs=300, seed=1)
    print(f"accuracy of the defaults after 3 epochs ({op.num_params} parameters, {op.num_samples} probe items): "
          f"λ_max {row['lambda_max']:.4f} vs {hi:.4f} (rel. error {abs(row['lambda_max']-hi)/abs(hi):.1e}); "
          f"λ_min {row['lambda_min']:.4f} vs {lo:.4f} (rel. error {abs(row['lambda_min']-lo)/abs(lo):.1e}); "
          f"trace {row['trace']:.1f} ± {row['trace_stderr']:.1f} vs {tr.estimate:.1f} ± {tr.stderr:.1f} (Hutch++, 300 products); "
          f"{row['num_matvecs']} products, {row['seconds']*1e3:.0f} ms")


if __name__ == '__main__':
    what = sys.argv[1] if len(sys.argv) > 1 else 'all'
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {runs} runs")
    if what in ('spectrum', 'all'):
        for n_epoch in (3, 10, 30): bench_spectrum(runs, n_epoch)
    if what in ('sharpness', 'all'): bench_sharpness(runs)
    if what in ('accuracy', 'all'): bench_accuracy()
    if what in ('variants', 'all'):
        bench_spectrum(runs, 3, at_epoch_end=True)
        bench_spectrum(runs, 3, at_epoch_end=True, trace=False)
