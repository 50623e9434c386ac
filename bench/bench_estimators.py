"""Benchmarks of the curvature estimators (issue 4) against PyHessian, measured in the same run on the same model.

    .venv/bin/python bench/bench_estimators.py [trace|density|session5|all] [--device cuda]

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
session5: (issue 21) trace relative error at 30 and 100 products over 10 seeds — fastsprkd XTrace, Hutch++, Hutchinson,
         PyHessian `trace(maxIter=100, tol=0)` (exactly 100 products; its first m samples are its m-product run, time prorated) and curvlinops' `xtrace` on its HessianLinearOperator — on
         the digits CNN above (256 images) and the seed CNN (SeedCNN, the same 256 digits at 28×28, 100 Adam steps), against the float64 model's
         dense trace; top-5 eigenvalues (products, time, error vs the float64 dense eigenvalues) of fastsprkd `eigsh`
         (float64 and float32 Lanczos arithmetic), scipy `eigsh` (float64 ARPACK) on curvlinops' float32 products, and
         PyHessian `eigenvalues(top_n=5)`; batched SLQ (timed product choice) vs one probe at a time. Not in `all`;
         `--model digits` or `--model seed` runs one of the two (two processes in parallel on a shared machine).
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


# ---------------------------------------------------------------- session 5: estimators at the accuracy limit (issue 21)
def _s5_models(n=256):
    """(name, float32 model in eval mode, loss, batch): DigitsCNN(8) trained 300 Adam steps (lr 3e-3) on n bundled digits
    (as `setup()`, fewer images) and the seed CNN (SeedCNN) trained 100 Adam steps on the same digits at 28×28."""
    from fastsprkd.models import SeedCNN
    out = []
    for name, make, side, lf, steps in (('digits CNN (DigitsCNN(8), 1,898 params, %d imgs)' % n, lambda: DigitsCNN(8), 8, nn.CrossEntropyLoss(), 300),
                                        ('seed CNN (SeedCNN, 1,710 params, %d imgs 28x28)' % n, lambda: SeedCNN(), 28, nn.NLLLoss(), 100)):
        torch.manual_seed(0)
        x, y = digits_tensors(n, side)
        model = make()
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(steps):
            opt.zero_grad(); lf(model(x), y).backward(); opt.step()
        model = model.to(DEVICE).eval(); model.zero_grad(set_to_none=True)
        out.append((name, model, lf, (x.to(DEVICE), y.to(DEVICE))))
    return out


def _dense64(model, lf, data):
    "The float64 model's dense Hessian (the reference for the float32 model's estimates)."
    import copy
    m64 = copy.deepcopy(model).double()
    H = HessianOperator(m64, lf, (data[0].double(), data[1])).to_dense()
    return (H + H.T) / 2


def _curvlinops_op(model, lf, data):
    from curvlinops import HessianLinearOperator
    return HessianLinearOperator(model, lf, [p for p in model.parameters() if p.requires_grad], [data], check_deterministic=False)


def _counting_pyhessian(h):
    "Count PyHessian's Hessian-vector products (its module-level `hessian_vector_product`)."
    import pyhessian
    ph = sys.modules['pyhessian.hessian']  # the module (the package exports the class under the same name)
    orig = ph.hessian_vector_product
    count = [0]
    def hvp(*a, **k):
        count[0] += 1
        return orig(*a, **k)
    ph.hessian_vector_product = hvp
    return count, lambda: setattr(ph, 'hessian_vector_product', orig)


def bench_session5(seeds=range(10), budgets=(30, 100)):
    "Trace relative error at 30 and 100 products, and top-5 eigenvalues: fastsprkd vs PyHessian vs curvlinops/scipy."
    import numpy as np, curvlinops
    from scipy.sparse.linalg import LinearOperator as SpOp, eigsh as sp_eigsh
    from fastsprkd.eigen import eigsh
    trace_rows, eig_rows, slq_rows = [], [], []
    only = sys.argv[sys.argv.index('--model') + 1] if '--model' in sys.argv else None
    for name, model, lf, data in _s5_models():
        if only is not None and not name.startswith(only): continue
        t0 = time.perf_counter()
        H = _dense64(model, lf, data)
        print(f"dense float64 Hessian in {time.perf_counter() - t0:.1f} s", flush=True)
        ref_tr, ref_ev = H.trace().item(), torch.linalg.eigvalsh(H)[-5:]
        op = HessianOperator(model, lf, data)
        op.matmat(torch.randn(op.num_params, 2, device=DEVICE))
        cop = _curvlinops_op(model, lf, data)
        from pyhessian import hessian
        import copy
        h = hessian(copy.deepcopy(model).eval(), lf, data=data, cuda=DEVICE == 'cuda')  # PyHessian leaves .grad graphs on its model
        rel = lambda e: abs(e - ref_tr) / abs(ref_tr)
        ph_runs = {}
        print(f"{name}: exact tr H = {ref_tr:.4f} (float64 dense), top-5 {ref_ev.tolist()}", flush=True)
        for m in budgets:
            errs = {k: [] for k in ('fastsprkd xtrace', 'fastsprkd hutch++', 'fastsprkd hutchinson', 'PyHessian trace()', 'curvlinops xtrace')}
            times = {k: [] for k in errs}
            for s in seeds:
                for meth in ('xtrace', 'hutch++', 'hutchinson'):
                    e, t = timed(lambda: trace(op, method=meth, num_matvecs=m, seed=s))
                    errs['fastsprkd ' + meth].append(rel(e.estimate)); times['fastsprkd ' + meth].append(t)
                if s not in ph_runs:  # one run of max(budgets) products: with tol=0 its first m samples are the m-product run
                    torch.manual_seed(s)
                    ph_runs[s] = timed(lambda: h.trace(maxIter=max(budgets), tol=0.))
                v, t = ph_runs[s]
                errs['PyHessian trace()'].append(rel(statistics.mean(v[:m]))); times['PyHessian trace()'].append(t * m / len(v))
                torch.manual_seed(s)
                v, t = timed(lambda: float(curvlinops.xtrace(cop, m)))
                errs['curvlinops xtrace'].append(rel(v)); times['curvlinops xtrace'].append(t)
            ph = statistics.median(errs['PyHessian trace()'])
            for k in errs:
                row = {'model': name.split(' (')[0], 'products': m, 'method': k,
                       'rel. error (median of 10 seeds)': f"{statistics.median(errs[k]):.2%}",
                       'ratio to PyHessian': f"{statistics.median(errs[k]) / ph:.2f}",
                       'time s (median)': f"{statistics.median(times[k]):.2f}"}
                trace_rows.append(row); print(row, flush=True)
        # top-5 eigenvalues, against the float64 model's and against the float32 operator's own dense eigenvalues
        t0 = time.perf_counter()
        H32 = op.to_dense().double()
        ref32 = torch.linalg.eigvalsh((H32 + H32.T) / 2)[-5:]
        print(f"dense float32 Hessian in {time.perf_counter() - t0:.1f} s; its top-5 vs the float64 model's: "
              f"{((ref32 - ref_ev).abs() / ref_ev.abs()).max().item():.1e}", flush=True)
        def err5(ev, ref=ref_ev): return ((torch.as_tensor(np.sort(np.asarray(ev, dtype=np.float64))[-5:]) - ref).abs() / ref.abs()).max().item()
        def errs5(ev): return {'top-5 max rel. error vs float64 model': f"{err5(ev):.1e}", 'vs float32 operator (dense)': f"{err5(ev, ref32):.1e}"}
        for key, kw in (('fastsprkd eigsh (float64 Lanczos, default)', {}), ('fastsprkd eigsh lanczos_dtype=float32', dict(lanczos_dtype=torch.float32))):
            r, t = timed(lambda: eigsh(op, 5, **kw))
            eig_rows.append({'model': name.split(' (')[0], 'method': key, 'products': r.num_matvecs, 'time s': f"{t:.2f}", **errs5(r.eigenvalues.tolist())})
            print(eig_rows[-1], flush=True)
        A = cop.to_scipy()
        cnt = [0]
        def mv(v):
            cnt[0] += 1
            return (A @ np.asarray(v, dtype=np.float32).ravel()).astype(np.float64)
        S = SpOp(A.shape, matvec=mv, dtype=np.float64)  # float64 ARPACK on curvlinops' float32 products
        ev, t = timed(lambda: sp_eigsh(S, k=5, which='LA', return_eigenvectors=False))
        eig_rows.append({'model': name.split(' (')[0], 'method': 'scipy eigsh (ARPACK) on curvlinops HessianLinearOperator', 'products': cnt[0], 'time s': f"{t:.2f}", **errs5(ev)})
        print(eig_rows[-1], flush=True)
        count, undo = _counting_pyhessian(h)
        try:
            torch.manual_seed(0)
            (ev, _), t = timed(lambda: h.eigenvalues(maxIter=100, tol=1e-3, top_n=5))
        finally: undo()
        eig_rows.append({'model': name.split(' (')[0], 'method': 'PyHessian eigenvalues(top_n=5) defaults', 'products': count[0], 'time s': f"{t:.2f}", **errs5(ev)})
        print(eig_rows[-1], flush=True)
        # batched SLQ: the timed choice vs one probe at a time (interleaved repeats, medians)
        if name.startswith('digits'):
            tb, t1 = [], []
            for _ in range(5):
                _, t = timed(lambda: spectral_density(op, num_probes=8, num_steps=40, seed=0)); tb.append(t)
                _, t = timed(lambda: spectral_density(op, num_probes=8, num_steps=40, seed=0, batch=1)); t1.append(t)
            slq_rows.append({'model': name.split(' (')[0], 'probes × steps': '8 × 40', 'batched (timed choice) s': f"{statistics.median(tb):.2f}",
                             'one probe at a time (batch=1) s': f"{statistics.median(t1):.2f}", 'ratio': f"{statistics.median(tb) / statistics.median(t1):.2f}"})
            print(slq_rows[-1], flush=True)
    for rows in (trace_rows, eig_rows, slq_rows):
        if rows: print(table(rows, list(rows[0])))
    return dict(trace=trace_rows, eig=eig_rows, slq=slq_rows)


if __name__ == '__main__':
    which = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith('--') else 'all'
    print(machine(), 'device:', DEVICE)
    fns = dict(trace=bench_trace, density=bench_density, session5=bench_session5)
    suffix = '' if DEVICE == 'cpu' else f'_{DEVICE}'
    for k, fn in fns.items():
        if which == k or (which == 'all' and k != 'session5'):
            tag = ('_' + sys.argv[sys.argv.index('--model') + 1]) if '--model' in sys.argv else ''
            print(f"results in {save('estimators_' + k + tag + suffix, fn())}")
