"""Benchmarks of the curvature estimators (issue 4) against PyHessian, measured in the same run on the same model.

    .venv/bin/python bench/bench_estimators.py [trace|density|all] [--device cuda]

Model: `DigitsCNN(width=8)` (1,898 parameters) trained 300 Adam steps (lr 3e-3) on 512 bundled digits images, its
Hessian over those 512 images in one batch (cross-entropy, eval mode); the same model object and batch for both
libraries. It is small enough for the exact reference: tr H and the eigenvalues from the dense Hessian.

trace:   PyHessian `hessian(...).trace()` at its defaults (maxIter=100, tol=1e-3: stops when the running mean changes
         by < 0.1%) vs `fastsprkd.trace` — Hutchinson and Hutch++ at PyHessian's own number of products, and Hutch++
         with the stopping rule rtol=1e-2 (standard error ≤ 1% of the estimate; budget 150, so a 50-vector sketch).
         Errors are |estimate − tr H| / tr H against the exact trace; 5 seeds (PyHessian draws from the global RNG, seeded the same).
density: PyHessian `hessian(...).density(iter, n_v)` vs `fastsprkd.spectral_density(num_steps=iter, num_probes=n_v)`
         for (n_v, iter) = (1, 100) (the tutorial's) and (8, 40): same algorithm, same size of quadrature (equal
         accuracy by construction); fastsprkd runs the n_v probes as one block, so each Lanczos step is one batched
         `matmat`. Compared by n·(density mean), which both estimate tr H, and the top node vs the exact λ_max.
         PyHessian's density() calls `torch.eig`, removed from torch 2, so a shim computing the same thing with
         `torch.linalg.eigh` (its T is symmetric) is installed for the run.
"""
import sys, time, statistics
import torch
from torch import nn
from common import digits_tensors, save, table, machine
from fastsprkd.core import HessianOperator
from fastsprkd.models import DigitsCNN
from fastsprkd.estimators import trace, spectral_density

torch.set_num_threads(min(2, torch.get_num_threads()))
DEVICE = sys.argv[sys.argv.index('--device') + 1] if '--device' in sys.argv else 'cpu'


_SETUP = {}
def setup():
    "The trained model, loss, batch, and the exact trace and eigenvalues (computed once)."
    if not _SETUP:
        torch.manual_seed(0)
        x, y = digits_tensors(512)
        model = DigitsCNN(8)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(300):
            opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
        model = model.to(DEVICE).eval(); model.zero_grad(set_to_none=True)
        lf, data = nn.CrossEntropyLoss(), (x.to(DEVICE), y.to(DEVICE))
        H = HessianOperator(model, lf, data).to_dense().double()
        _SETUP.update(model=model, lf=lf, data=data, trace=H.trace().item(), eigvals=torch.linalg.eigvalsh((H + H.T) / 2).cpu())
    return _SETUP['model'], _SETUP['lf'], _SETUP['data']


def sync():
    if DEVICE == 'cuda': torch.cuda.synchronize()


def timed(fn):
    sync(); t0 = time.perf_counter(); out = fn(); sync()
    return out, time.perf_counter() - t0


def pyhessian_for(model, lf, data):
    from pyhessian import hessian
    m = DigitsCNN(8).to(DEVICE); m.load_state_dict(model.state_dict())  # PyHessian leaves .grad graphs on its model
    return hessian(m.eval(), lf, data=data, cuda=DEVICE == 'cuda')


def bench_trace(seeds=range(5)):
    model, lf, data = setup()
    op = HessianOperator(model, lf, data)
    op.matmat(torch.randn(op.num_params, 2, device=DEVICE))  # warm-up (mode choice, first-call overheads)
    ref = _SETUP['trace']
    print(f"exact tr H = {ref:.4f} (dense Hessian, {op.num_params} parameters)", flush=True)
    rel = lambda e: abs(e - ref) / abs(ref)
    rows = {k: [] for k in ('PyHessian trace() defaults', 'fastsprkd hutchinson (same products)',
                            'fastsprkd hutch++ (same products)', 'fastsprkd hutch++ rtol=1e-2')}
    h = pyhessian_for(model, lf, data)
    for s in seeds:
        torch.manual_seed(s)
        vals, t = timed(lambda: h.trace())
        m = len(vals)
        rows['PyHessian trace() defaults'].append((m, t, statistics.mean(vals), float('nan')))
        for key, kw in [('fastsprkd hutchinson (same products)', dict(method='hutchinson', num_matvecs=max(m, 2))),
                        ('fastsprkd hutch++ (same products)', dict(method='hutch++', num_matvecs=max(m, 6))),
                        ('fastsprkd hutch++ rtol=1e-2', dict(method='hutch++', num_matvecs=150, rtol=1e-2, batch=10))]:
            est, t = timed(lambda: trace(op, seed=s, **kw))
            rows[key].append((est.num_matvecs, t, est.estimate, est.stderr))
    out = []
    for k, rs in rows.items():
        out.append({'method': k, 'products (median)': int(statistics.median(r[0] for r in rs)),
                    'time s (median)': f"{statistics.median(r[1] for r in rs):.2f}",
                    'rel. error (median)': f"{statistics.median(rel(r[2]) for r in rs):.2%}",
                    'rel. error (max)': f"{max(rel(r[2]) for r in rs):.2%}",
                    'reported rel. stderr (median)': '—' if k.startswith('PyHessian') else
                        f"{statistics.median(r[3] / abs(r[2]) for r in rs):.2%}"})
        print(out[-1], flush=True)
    print(table(out, list(out[0])))
    return [dict(exact_trace=ref, device=DEVICE)] + out


def _eig_shim():
    "torch.eig (removed in torch 2) for PyHessian's symmetric tridiagonal T: eigenvalues as an n×2 (real, imag) tensor."
    def eig(A, eigenvectors=False):
        w, V = torch.linalg.eigh(A)
        return torch.stack([w, torch.zeros_like(w)], 1), V
    return eig


def bench_density(settings=((1, 100), (8, 40))):
    model, lf, data = setup()
    op = HessianOperator(model, lf, data)
    op.matmat(torch.randn(op.num_params, 2, device=DEVICE))
    n = op.num_params
    h = pyhessian_for(model, lf, data)
    had = hasattr(torch, 'eig')
    orig = torch.eig if had else None
    torch.eig = _eig_shim()
    out = []
    try:
        for n_v, steps in settings:
            t_ph, t_us = [], []
            for r in range(3):  # interleaved repeats, medians (the machine may be shared)
                torch.manual_seed(0)
                (ev, w), t = timed(lambda: h.density(iter=steps, n_v=n_v)); t_ph.append(t)
                sd, t = timed(lambda: spectral_density(op, num_probes=n_v, num_steps=steps, seed=0)); t_us.append(t)
            t_ph, t_us = statistics.median(t_ph), statistics.median(t_us)
            ph_mean = sum(sum(a * b for a, b in zip(e, ww)) for e, ww in zip(ev, w)) / n_v
            row = {'probes × steps': f"{n_v} × {steps}", 'PyHessian density() s': f"{t_ph:.2f}",
                   'fastsprkd spectral_density s': f"{t_us:.2f}", 'speedup': f"{t_ph / t_us:.2f}x",
                   'PyHessian n·mean': f"{n * ph_mean:.2f}", 'fastsprkd n·mean': f"{n * sd.mean:.2f}",
                   'fastsprkd tr stderr': f"{sd.trace().stderr:.2f}" if n_v > 1 else '—',
                   'exact tr H': f"{_SETUP['trace']:.2f}",
                   'PyHessian top node': f"{max(max(e) for e in ev):.4f}", 'fastsprkd top node': f"{sd.nodes.max().item():.4f}",
                   'exact λ_max': f"{_SETUP['eigvals'][-1].item():.4f}"}
            out.append(row); print(row, flush=True)
    finally:
        if had: torch.eig = orig
        else: del torch.eig
    print(table(out, list(out[0])))
    return out


if __name__ == '__main__':
    which = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith('--') else 'all'
    print(machine(), 'device:', DEVICE)
    fns = dict(trace=bench_trace, density=bench_density)
    suffix = '' if DEVICE == 'cpu' else f'_{DEVICE}'
    for k, fn in fns.items():
        if which in (k, 'all'): print(f"results in {save('estimators_' + k + suffix, fn())}")
