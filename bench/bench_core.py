"""Benchmarks of the Hessian core (issue 3), each next to a peer measured in the same run.

    .venv/bin/python bench/bench_core.py [hvp|matmat|eigsh|dense|all]

hvp:    HVP / gradient time on one batch, both modes (cached graph and not), vs plain torch.func and PyHessian.
matmat: matmat with K=16 vs 16 matvec calls, over 4 batches (no graph cache).
eigsh:  top-5 eigenvalues, eigsh vs PyHessian's hessian.eigenvalues(top_n=5) at its defaults.
dense:  dense Hessian of the seed CNN over 1,500 images vs the original per-entry loop (timed on a subset of rows, scaled).
"""
import sys, time
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


def bench_eigsh(k=5):
    rows = []
    for name, model, x, y, lf in bench_models():
        model.eval()
        op = HessianOperator(model, lf, (x, y))
        ref = eigsh(op, k=k, which='LA', tol=1e-8, max_matvecs=400).eigenvalues
        op2 = HessianOperator(model, lf, (x, y))
        t0 = time.perf_counter(); r = eigsh(op2, k=k, which='LA', tol=1e-4); t_ours = time.perf_counter() - t0
        err_ours = ((r.eigenvalues - ref).abs() / ref.abs()).max().item()
        from pyhessian import hessian
        h = hessian(model, lf, data=(x, y), cuda=False)
        calls = [0]
        import importlib; PH = importlib.import_module('pyhessian.hessian')
        orig = PH.hessian_vector_product
        def counted(*a, **kw): calls[0] += 1; return orig(*a, **kw)
        PH.hessian_vector_product = counted
        try:
            torch.manual_seed(0)
            t0 = time.perf_counter(); vals, _ = h.eigenvalues(top_n=k); t_ph = time.perf_counter() - t0
        finally: PH.hessian_vector_product = orig
        vals = torch.tensor(sorted(vals), dtype=ref.dtype)
        err_ph = ((vals - ref).abs() / ref.abs()).max().item()
        row = dict(model=name, **{'eigsh HVPs': r.num_matvecs, 'eigsh s': f"{t_ours:.2f}", 'eigsh max rel err': f"{err_ours:.1e}",
                                  'PyHessian HVPs': calls[0], 'PyHessian s': f"{t_ph:.2f}", 'PyHessian max rel err': f"{err_ph:.1e}",
                                  'HVP ratio': f"{r.num_matvecs/calls[0]:.2f}", 'time ratio': f"{t_ph/t_ours:.2f}x"})
        rows.append(row); print(row, flush=True)
    print(table(rows, list(rows[0])))
    return rows


def bench_dense(rows_timed=40):
    name, model, x, y, lf = bench_models()[0]
    model.eval()
    op = HessianOperator(model, lf, (x, y))
    t0 = time.perf_counter(); H = op.to_dense(); t_ours = time.perf_counter() - t0
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
    r = dict(model=name, **{'to_dense (s)': f"{t_ours:.1f}", 'mode': op._auto.get(True),
                            f'per-entry loop (s, {rows_timed} rows timed, scaled to {op.num_params})': f"{t_loop:.1f}",
                            'speedup': f"{t_loop/t_ours:.1f}x", 'max rel diff': f"{err:.1e}"})
    print(r); print(table([r], list(r)))
    return [r]


if __name__ == '__main__':
    which = sys.argv[1] if len(sys.argv) > 1 else 'all'
    print(machine())
    fns = dict(hvp=bench_hvp, matmat=bench_matmat, eigsh=bench_eigsh, dense=bench_dense)
    for k, fn in fns.items():
        if which in (k, 'all'): print(f"results in {save(k, fn())}")
