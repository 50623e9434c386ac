"""Benchmarks of the Hessian core (issue 3), each next to a peer measured in the same run.

    .venv/bin/python bench/bench_core.py [hvp|matmat|memory|eigsh|dense|all]

hvp:    HVP / gradient time on one batch, both modes (cached graph and not), vs plain torch.func and PyHessian.
matmat: matmat with K=16 vs 16 matvec calls, over 4 batches (no graph cache).
memory: peak memory of one HVP vs one gradient, and of matmat K=16 under memory budgets (fresh subprocesses, Linux
        VmHWM after resetting it through /proc/self/clear_refs: the resident-set growth the call causes).
eigsh:  top-5 eigenvalues, eigsh vs PyHessian's hessian.eigenvalues(top_n=5) at its defaults, 5 seeds each (`eigsh [tol]`, default 1e-4).
dense:  dense Hessian of the seed CNN over 1,500 images vs the original per-entry loop (timed on a subset of rows, scaled)
        and vs the previous column-by-column products (timed on a subset of columns, scaled).
"""
import sys, time, json, os, re, subprocess, statistics
import torch
from torch import nn
from torch.func import functional_call, grad, jvp
from common import median_time, bench_models, save, table, machine
from fastsprkd.core import HessianOperator
from fastsprkd.eigen import eigsh, power_iteration

torch.set_num_threads(min(2, torch.get_num_threads()))


def plain_grad(model, lf, x, y):
    ps = [p for p in model.parameters()]
    return lambda: torch.autograd.grad(lf(model(x), y), ps)


def torch_func_hvp(model, lf, x, y):
    "The peer: plain torch.func forward-over-reverse, no caching."
    names = [n for n, _ in model.named_parameters()]
    theta = tuple(p.detach() for p in model.parameters())
    f = lambda ps: lf(functional_call(model, dict(zip(names, ps)), (x,)), y)
    v = tuple(torch.randn_like(t) for t in theta)
    return lambda: jvp(grad(f), (theta,), (v,))[1]


def pyhessian_hvp(model, lf, x, y):
    "The peer: PyHessian's HVP (gradient graph built once, one double-backward per product)."
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product
    h = hessian(model, lf, data=(x, y), cuda=False)
    v = [torch.randn_like(p) for p in h.params]
    return h, lambda: hessian_vector_product(h.gradsH, h.params, v)


def bench_hvp():
    rows = []
    for name, model, x, y, lf in bench_models():
        model.eval()
        tg = median_time(plain_grad(model, lf, x, y))
        r = dict(model=name, grad_ms=f"{tg*1e3:.1f}")
        for mode, cache in [('fwd', False), ('rev', False), ('rev', True)]:
            op = HessianOperator(model, lf, (x, y), mode=mode, cache_graph=cache)
            v = torch.randn(op.num_params)
            t = median_time(lambda: op.matvec(v))
            r[f"{mode}{'+cache' if cache else ''}"] = f"{t/tg:.2f}x"
        auto = HessianOperator(model, lf, (x, y))
        v = torch.randn(auto.num_params)
        r['auto'] = f"{median_time(lambda: auto.matvec(v))/tg:.2f}x ({auto._auto.get(False)})"
        r['torch.func jvp(grad)'] = f"{median_time(torch_func_hvp(model, lf, x, y))/tg:.2f}x"
        _, f = pyhessian_hvp(model, lf, x, y)
        r['PyHessian hv (graph kept)'] = f"{median_time(f)/tg:.2f}x"
        rows.append(r); print(r, flush=True)
    print(table(rows, list(rows[0])))
    return rows


def bench_matmat(K=16):
    rows = []
    for name, model, x, y, lf in bench_models():
        model.eval()
        batches = [(xb, yb) for xb, yb in zip(x.chunk(4), y.chunk(4))]
        for mode in ('fwd', 'rev'):
            op = HessianOperator(model, lf, batches, mode=mode)
            V = torch.randn(op.num_params, K)
            tmm = median_time(lambda: op.matmat(V), repeat=3)
            tmv = median_time(lambda: [op.matvec(V[:, k]) for k in range(K)], repeat=3)
            r = dict(model=name, mode=mode, **{f'matmat K={K} (s)': f"{tmm:.3f}", f'{K}× matvec (s)': f"{tmv:.3f}",
                                              'speedup': f"{tmv/tmm:.2f}x"})
            rows.append(r); print(r, flush=True)
    print(table(rows, list(rows[0])))
    return rows


def _krylov_products(op64, v0, ref, target=1e-6, max_m=60):
    "Products an unrestarted exact Lanczos from `v0` needs before its top-k Ritz values are within `target` (relative) of `ref`."
    from fastsprkd.eigen import lanczos
    a, b, _ = lanczos(op64, v0, max_m)
    k = ref.shape[0]
    for m in range(k, a.shape[0] + 1):
        T = torch.diag(a[:m]) + torch.diag(b[:m-1], 1) + torch.diag(b[:m-1], -1)
        if ((torch.linalg.eigvalsh(T)[-k:] - ref).abs() / ref.abs()).max() < target: return m
    return None


def bench_eigsh(k=5, tol=1e-4, seeds=5):
    """Top-k eigenvalues: eigsh (with and without its check for missed eigenvalues) vs PyHessian's
    hessian.eigenvalues(top_n=k) at its defaults, `seeds` random starts each (medians, [min-max])."""
    import copy, importlib
    from pyhessian import hessian
    PH = importlib.import_module('pyhessian.hessian')
    med = lambda xs: statistics.median(xs)
    span = lambda xs, f='{}': f"{f.format(med(xs))} [{f.format(min(xs))}-{f.format(max(xs))}]"
    rows = []
    for name, model, x, y, lf in bench_models():
        model.eval()
        # float64 reference from an independent start vector, converged far below the compared tolerance
        m64 = copy.deepcopy(model).double()
        op64 = HessianOperator(m64, lf, (x.double(), y))
        ref = eigsh(op64, k=k, which='LA', tol=1e-10, seed=123, max_matvecs=2000).eigenvalues
        rel = lambda vals: ((torch.sort(vals.double()).values - ref).abs() / ref.abs()).max().item()
        res = {key: [] for key in ('n1', 'n0', 't1', 't0', 'e1', 'e0', 'f1', 'f0', 'nph', 'tph', 'eph', 'kry')}
        for seed in range(seeds):
            for verify in (True, False):
                op = HessianOperator(model, lf, (x, y))
                op.matvec(torch.randn(op.num_params))  # 'auto' picks its mode on this first product: not counted
                before = op.num_matvecs
                t0 = time.perf_counter(); r = eigsh(op, k=k, which='LA', tol=tol, verify=verify, seed=seed); t = time.perf_counter() - t0
                r64 = eigsh(op64, k=k, which='LA', tol=tol, verify=verify, seed=seed)
                v = int(verify)
                res[f'n{v}'].append(op.num_matvecs - before); res[f't{v}'].append(t)
                res[f'e{v}'].append(rel(r.eigenvalues)); res[f'f{v}'].append(rel(r64.eigenvalues))
            v0 = torch.randn(op64.num_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            res['kry'].append(_krylov_products(op64, v0, ref))
            h = hessian(model, lf, data=(x, y), cuda=False)
            calls = [0]
            orig = PH.hessian_vector_product
            def counted(*a, **kw): calls[0] += 1; return orig(*a, **kw)
            PH.hessian_vector_product = counted
            try:
                torch.manual_seed(seed)
                t0 = time.perf_counter(); vals, _ = h.eigenvalues(top_n=k); t_ph = time.perf_counter() - t0
            finally: PH.hessian_vector_product = orig
            res['nph'].append(calls[0]); res['tph'].append(t_ph); res['eph'].append(rel(torch.tensor(vals)))
        row = dict(model=name, **{
            'eigsh HVPs': span(res['n1']), 'eigsh s': span(res['t1'], '{:.2f}'),
            'eigsh err f32 / f64': f"{max(res['e1']):.1e} / {max(res['f1']):.1e}",
            'verify=False HVPs': span(res['n0']), 'verify=False s': span(res['t0'], '{:.2f}'),
            'verify=False err f32 / f64': f"{max(res['e0']):.1e} / {max(res['f0']):.1e}",
            'exact Krylov HVPs for 1e-6': span(res['kry']),
            'PyHessian HVPs': span(res['nph']), 'PyHessian s': span(res['tph'], '{:.2f}'),
            'PyHessian err': f"{min(res['eph']):.1e}-{max(res['eph']):.1e}",
            'HVP ratio (verify / not)': f"{med(res['n1'])/med(res['nph']):.2f} / {med(res['n0'])/med(res['nph']):.2f}",
            'Krylov / PyHessian HVPs': f"{med(res['kry'])/med(res['nph']):.2f}",
            'time PyHessian/eigsh (verify / not)': f"{med(res['tph'])/med(res['t1']):.2f}x / {med(res['tph'])/med(res['t0']):.2f}x"})
        rows.append(row); print(row, flush=True)
    print(table(rows, list(rows[0])))
    return rows


def bench_dense(rows_timed=20, cols_timed=72, repeat=3):
    name, model, x, y, lf = bench_models()[0]
    model.eval()
    op = HessianOperator(model, lf, (x, y))
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter(); H = op.to_dense(); ts.append(time.perf_counter() - t0)
    t_ours = statistics.median(ts)
    # the previous method: products with the basis vectors (vmap'd forward-over-reverse over the whole network)
    E = torch.eye(op.num_params)[:, :cols_timed]
    op_cols = HessianOperator(model, lf, (x, y), mode='fwd')
    op_cols.matmat(E[:, :2])  # warm-up (first-call costs), not timed
    t0 = time.perf_counter(); C = op_cols.matmat(E); t_cols = (time.perf_counter() - t0) / cols_timed * op.num_params
    err_cols = ((C - H[:, :cols_timed]).abs().max() / H.abs().max()).item()
    # the original notebook: gradient with create_graph, then one backward per entry of the gradient
    ps = list(model.parameters())
    t0 = time.perf_counter()
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(lf(model(x), y), ps, create_graph=True)])
    rows = []
    for i in range(rows_timed):
        gi = torch.autograd.grad(g[i], ps, retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in gi]))
    t_loop = (time.perf_counter() - t0) / rows_timed * op.num_params
    err = (torch.stack(rows) - H[:rows_timed]).abs().max().item() / H.abs().max().item()
    r = dict(model=name, **{f'to_dense (s, median of {repeat})': f"{t_ours:.2f}",
                            f'per-entry loop (s, {rows_timed} rows timed, scaled to {op.num_params})': f"{t_loop:.1f}",
                            'speedup vs loop': f"{t_loop/t_ours:.0f}x",
                            f'column products (s, {cols_timed} cols timed, scaled)': f"{t_cols:.1f}",
                            'speedup vs columns': f"{t_cols/t_ours:.1f}x",
                            'max rel diff (loop rows, columns)': f"{err:.1e}, {err_cols:.1e}"})
    print(r); print(table([r], list(r)))
    return [r]


def _mem_kb():
    st = open('/proc/self/status').read()
    return {k: int(re.search(k + r':\s+(\d+)', st).group(1)) for k in ('VmRSS', 'VmHWM')}

def _mem_child(model_idx, what, budget=None):
    """Run in a fresh process: set up, run `what` once on 8 samples (loads lazily imported code and one-time state, which
    are not the call's memory), reset the peak RSS, run `what` once on the data, print the peak growth in MiB."""
    name, model, x, y, lf = bench_models()[int(model_idx)]
    model.eval()
    _mem_setup(model, lf, x[:8], y[:8], what, budget)[0]()
    fn, what = _mem_setup(model, lf, x, y, what, budget)
    open('/proc/self/clear_refs', 'w').write('5')
    before = _mem_kb()['VmRSS']
    out = fn()
    peak = _mem_kb()['VmHWM']
    chunk = max(1, min(16, int(budget) // fn.op._per_vec_bytes)) if what == 'matmat' else None
    print(json.dumps(dict(what=what, peak_mib=(peak - before) / 1024, chunk=chunk)))

def _mem_setup(model, lf, x, y, what, budget):
    if what == 'grad':
        ps = list(model.parameters())
        fn = lambda: torch.autograd.grad(lf(model(x), y), ps)
    elif what in ('hvp_fwd', 'hvp_rev'):
        op = HessianOperator(model, lf, (x, y), mode=what[4:], cache_graph=False)
        v = torch.randn(op.num_params)
        fn = lambda: op.matvec(v)
    elif what == 'pyhessian_hvp':
        from pyhessian.utils import hessian_vector_product
        ps = list(model.parameters())
        v = [torch.randn_like(p) for p in ps]
        def fn():
            gs = torch.autograd.grad(lf(model(x), y), ps, create_graph=True)
            return hessian_vector_product(gs, ps, v)
    else:  # matmat with K=16 under a memory budget (or one matvec: 'matvec'), over 4 batches
        batches = [(xb, yb) for xb, yb in zip(x.chunk(4), y.chunk(4))]
        op = HessianOperator(model, lf, batches, mode='fwd', memory_budget=int(budget or 2**30))
        V = torch.randn(op.num_params, 16)
        fn = (lambda: op.matmat(V)) if what == 'matmat' else (lambda: op.matvec(V[:, 0]))
        fn.op = op
    return fn, what

def _mem(model_idx, what, budget=None, repeat=1):
    "Median over `repeat` fresh processes."
    vals = []
    for _ in range(repeat):
        cmd = [sys.executable, __file__, '_mem', str(model_idx), what] + ([str(budget)] if budget else [])
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        vals.append(out['peak_mib'])
    return (statistics.median(vals), out['chunk']) if what == 'matmat' else statistics.median(vals)

def bench_memory():
    rows = []
    for i, (name, model, x, y, lf) in enumerate(bench_models()):
        g = _mem(i, 'grad')
        r = dict(model=name, **{'grad MiB': f"{g:.1f}"})
        for what in ('hvp_fwd', 'hvp_rev', 'pyhessian_hvp'):
            m = _mem(i, what)
            r[f'{what} MiB (ratio)'] = f"{m:.1f} ({m/g:.2f}x)"
        rows.append(r); print(r, flush=True)
    print(table(rows, list(rows[0])))
    rows2 = []
    name = bench_models()[0][0]
    base = _mem(0, 'matvec')
    for budget in (2**24, 2**26, 2**28):
        m, chunk = _mem(0, 'matmat', budget)
        r = dict(model=name + ', 4 batches', **{'memory_budget MiB': f"{budget / 2**20:.0f}", 'vectors per chunk': chunk,
                                'one matvec peak MiB': f"{base:.1f}", 'matmat K=16 peak MiB': f"{m:.1f}",
                                'matmat − matvec MiB': f"{m - base:.1f}", 'within budget': 'yes' if m - base <= budget / 2**20 else 'no'})
        rows2.append(r); print(r, flush=True)
    print(table(rows2, list(rows2[0])))
    return rows + rows2


if __name__ == '__main__':
    which = sys.argv[1] if len(sys.argv) > 1 else 'all'
    if which == '_mem': _mem_child(*sys.argv[2:]); sys.exit()
    print(machine())
    fns = dict(hvp=bench_hvp, matmat=bench_matmat, memory=bench_memory, dense=bench_dense,
               eigsh=lambda: bench_eigsh(tol=float(sys.argv[2]) if len(sys.argv) > 2 else 1e-4))
    for k, fn in fns.items():
        if which in (k, 'all'): print(f"results in {save(k, fn())}")
