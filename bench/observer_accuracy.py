"""Accuracy of the observer's trace and λ_min settings on MNIST-1D against the dense Hessian (issue 21).

    nice -n 10 python bench/observer_accuracy.py [epochs=3]

Trains the MNIST-1D CNN (bench/mnist1d_common.py) with Adam for `epochs`, builds the observer's default probe operator (128 training
items, eval mode), computes the dense Hessian (5,210², float32 products, symmetrized in float64), then: Hutch++ and Hutchinson
trace errors and reported standard errors at 12-150 products (medians over 6 seeds), Hutch++ with the 5% stderr stop at caps 60
and 99, and λ_min from eigsh(tol=1e-2) refined to a residual of 5% and 1% of |λ_min| (`refine_smallest`'s criterion)."""
import sys, time, torch
sys.path.insert(0, 'bench')
from mnist1d_common import *
from fastsprkd.core import HessianOperator
from fastsprkd.estimators import trace
from fastsprkd.eigen import eigsh
from fastsprkd.data import probe_batches
data = mnist1d_tensors()
learn = mnist1d_learner(data)
with learn.no_bar(), learn.no_logging(): learn.fit(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
probe = probe_batches(learn.dls.train, 128, 0, bs=128)
op = HessianOperator(learn.model, learn.loss_func, probe, mode='rev', eval_mode=True)
t = time.perf_counter(); H = op.to_dense().double(); print('dense', time.perf_counter() - t, flush=True)
H = (H + H.T) / 2; ev = torch.linalg.eigvalsh(H); ex = H.trace().item()
print('exact trace', ex, 'lmax', ev[-1].item(), 'lmin', ev[0].item(), 'top5', ev[-5:].tolist(), flush=True)
for m in (12, 30, 45, 60, 99, 150):
    for meth in ('hutch++', 'hutchinson'):
        errs, ses = [], []
        t = time.perf_counter()
        for s in range(6):
            e = trace(op, method=meth, num_matvecs=m, seed=s)
            errs.append(abs(e.estimate - ex) / ex); ses.append(e.stderr / abs(e.estimate))
        print(m, meth, 'med rel err %.3f' % torch.tensor(errs).median(), 'med rel stderr %.3f' % torch.tensor(ses).median(), 'time/est %.2f' % ((time.perf_counter()-t)/6), flush=True)
for m in (60, 99, 150):
    errs, ses, used = [], [], []
    for s in range(6):
        e = trace(op, method='hutch++', num_matvecs=m, seed=s, rtol=0.05)
        errs.append(abs(e.estimate - ex) / ex); ses.append(e.stderr / abs(e.estimate)); used.append(e.num_matvecs)
    print('rtol .05 cap', m, 'err', [round(x, 3) for x in errs], 'se', [round(x, 3) for x in ses], used, flush=True)
from fastsprkd.stability import refine_smallest
for tol in (1e-2,):
    r = eigsh(op, 2, 'BE', tol=tol, max_matvecs=40, ncv=10, warn=False)
    print('BE tol', tol, r.eigenvalues.tolist(), r.residuals.tolist(), r.num_matvecs)
    for rt in (0.05, 0.01):
        r2 = refine_smallest(op, r, rt, max_matvecs=200, ncv=10)
        print(' refined to rtol', rt, 'λ_min', r2.eigenvalues[0].item(), 'residual', r2.residuals[0].item(), 'extra products', r2.num_matvecs - r.num_matvecs,
              'exact', ev[0].item(), 'rel err', abs(r2.eigenvalues[0].item() - ev[0].item()) / abs(ev[0].item()))
# the preconditioned sharpness at the observer's settings (tol 1e-2, ncv 10, 40 products) vs the dense P^{-1/2} H P^{-1/2}
from fastsprkd.stability import adam_preconditioner, edge_of_stability
pre = adam_preconditioner(learn.opt, op.params)
s = pre.diag.rsqrt()
pe = torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1].item()
e = edge_of_stability(op, learn.opt, tol=1e-2, max_matvecs=40, ncv=10, warn=False)
print('precond sharpness dense', pe, 'observer settings', e.sharpness, 'rel err', abs(e.sharpness - pe) / pe, 'residual', e.residual,
      'products', e.num_matvecs, 'threshold', e.threshold)
