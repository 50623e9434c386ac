"""ResNet-18 on 3×32×32 images (issue 9): HVP cost, top-5 eigenpairs and peak memory, next to PyHessian in the same run.

    .venv/bin/python bench/bench_resnet.py [hvp|eigsh|memory|profile|all] [--bs 128] [--threads 2] [--repeat 3] [--device cpu|cuda] [--compile]

On a GPU (issue 9): `python bench/bench_resnet.py hvp --device cuda --bs 256 --repeat 10 --compile` and
`python bench/bench_resnet.py eigsh --device cuda --bs 256 --ph-maxiter 100`.

hvp:    time of one HVP (fwd, rev with the gradient graph kept, rev rebuilt) / time of one gradient, and PyHessian's
        `hessian_vector_product` (its graph kept) on the same model and batch; `--repeat` interleaved rounds (one
        gradient, then each product once), medians over the rounds of the ratio to that round's gradient, and HVPs
        per second (1 / median time). `--compile`: also plain torch.func forward-over-reverse, eager and under
        `torch.compile` (compiled once before the rounds; its compile time is reported), to see whether compiling
        the product helps on that device. CUDA timings synchronize before and after each call.
eigsh:  top-5 eigenvalues: `eigsh(k=5, which='LA', tol=1e-3)` vs PyHessian `hessian.eigenvalues(top_n=5, tol=1e-3)`
        (its `maxIter` capped by `--ph-maxiter`, see the output), wall time and products, same model and batch.
profile: where an eigsh product's time goes: medians of 3 products (fastsprkd 'rev' with the graph kept, PyHessian's
        hv), then a cProfile of `eigsh(op, 5, 'LA', tol=1e-3, max_matvecs=12, verify=False)` (per product, top entries).
memory: peak resident memory (getrusage ru_maxrss) of a fresh process that builds the model, the batch and a
        `HessianOperator` and runs one matvec or one matmat, for each mode.
Model: torchvision `resnet18(weights=None, num_classes=10)` in eval mode (BatchNorm running statistics, as
PyHessian does), float32, CPU; data: the bundled digits, 3 channels, upsampled to 32×32.
"""
import argparse, json, os, resource, subprocess, sys, time
import torch
from torch import nn

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from common import median_time, save, table, machine


def setup(bs, device='cpu'):
    import torchvision
    from fastsprkd.data import digits_tensors
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval().to(device)
    x, y = digits_tensors()
    x = nn.functional.interpolate(x[:bs], size=(32, 32), mode='bilinear', align_corners=False).expand(-1, 3, -1, -1).contiguous()
    return model, x.to(device), y[:bs].to(device), nn.CrossEntropyLoss()


def _sync(device):
    if str(device).startswith('cuda'): torch.cuda.synchronize()


def _torch_func_hvp(model, lf, x, y):
    "Plain torch.func forward-over-reverse on the whole model (the peer, and what `--compile` compiles)."
    from torch.func import functional_call, grad, jvp
    names = [n for n, _ in model.named_parameters()]
    theta = tuple(p.detach() for p in model.parameters())
    f = lambda ps: lf(functional_call(model, dict(zip(names, ps)), (x,)), y)
    return theta, (lambda v: jvp(grad(f), (theta,), (v,))[1])


def bench_hvp(bs, repeat, device='cpu', compile=False):
    "Interleaved rounds (gradient, then each contender once): a load change hits all of them alike; medians over rounds."
    import statistics
    from fastsprkd.core import HessianOperator
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product
    model, x, y, lf = setup(bs, device)
    ps = list(model.parameters())
    ops = {label: HessianOperator(model, lf, (x, y), mode=mode, cache_graph=cache)
           for label, mode, cache in [('fwd', 'fwd', False), ('rev+cache', 'rev', True), ('rev', 'rev', False)]}
    v = torch.randn(ops['fwd'].num_params, device=device)
    h = hessian(model, lf, data=(x, y), cuda=str(device).startswith('cuda'))
    vs = [torch.randn_like(p) for p in h.params]
    fns = {'grad': lambda: torch.autograd.grad(lf(model(x), y), ps),
           **{label: (lambda op=op: op.matvec(v)) for label, op in ops.items()},
           'PyHessian hv (graph kept)': lambda: hessian_vector_product(h.gradsH, h.params, vs)}
    row = dict(model=f'ResNet-18 ({sum(p.numel() for p in ps):,} params), batch {bs}, 3x32x32', device=_device_name(device))
    if compile:
        theta, hvp = _torch_func_hvp(model, lf, x, y)
        tv = tuple(torch.randn_like(t) for t in theta)
        fns['torch.func jvp(grad)'] = lambda: hvp(tv)
        try:
            t0 = time.perf_counter(); compiled = torch.compile(hvp); out = compiled(tv); _sync(device)
            row['compile_s'] = f"{time.perf_counter() - t0:.0f}"
            ref = hvp(tv)
            row['compiled max rel diff'] = f"{max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(out, ref)):.1e}"
            fns['torch.compile(jvp(grad))'] = lambda: compiled(tv)
        except Exception as e:  # report, do not hide: compiling the product may not work on every version/device
            row['compile_s'] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    times = {k: [] for k in fns}
    for r in range(repeat + 1):  # round 0: warm-up (kept graph built, first-call costs), not counted
        for k, fn in fns.items():
            _sync(device); t0 = time.perf_counter(); fn(); _sync(device); dt = time.perf_counter() - t0
            if r: times[k].append(dt)
    tg = statistics.median(times['grad'])
    row['grad_s'] = f"{tg:.4f}"
    for k in fns:
        if k == 'grad': continue
        t = statistics.median(times[k])
        ratio = statistics.median(a / g for a, g in zip(times[k], times['grad']))  # per round: same load
        row[k] = f"{ratio:.2f}x ({t:.4f} s, {1 / t:.1f} HVP/s)"
    print(row, flush=True)
    return [row]


def _device_name(device):
    return torch.cuda.get_device_name(torch.device(device)) if str(device).startswith('cuda') else f'CPU, {torch.get_num_threads()} threads'


def bench_eigsh(bs, ph_maxiter, k=5, device='cpu'):
    from fastsprkd.core import HessianOperator
    from fastsprkd.eigen import eigsh
    from pyhessian import hessian
    import importlib
    model, x, y, lf = setup(bs, device)
    op = HessianOperator(model, lf, (x, y), mode='rev')  # graph kept between products (single batch), like PyHessian's
    _sync(device); t0 = time.perf_counter(); r = eigsh(op, k=k, which='LA', tol=1e-3, max_matvecs=200, seed=0); _sync(device); t_ours = time.perf_counter() - t0
    ours = sorted(r.eigenvalues.tolist())
    rss_eigsh = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far: model, batch, operator and Lanczos
    # without the check for missed eigenvalues (PyHessian has none)
    _sync(device); t0 = time.perf_counter(); r0 = eigsh(op, k=k, which='LA', tol=1e-3, max_matvecs=200, seed=0, verify=False); _sync(device); t_nov = time.perf_counter() - t0
    PH = importlib.import_module('pyhessian.hessian')
    orig, calls = PH.hessian_vector_product, [0]
    def counted(*a, **kw): calls[0] += 1; return orig(*a, **kw)
    PH.hessian_vector_product = counted
    try:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        h = hessian(model, lf, data=(x, y), cuda=str(device).startswith('cuda'))  # its gradient graph: part of its cost
        vals, _ = h.eigenvalues(maxIter=ph_maxiter, tol=1e-3, top_n=k)
        _sync(device); t_ph = time.perf_counter() - t0
    finally: PH.hessian_vector_product = orig
    vals = sorted(vals)
    rel = max(abs(a - b) / abs(a) for a, b in zip(ours, vals))
    row = {'device': _device_name(device), 'eigsh HVPs': r.num_matvecs, 'eigsh s': f"{t_ours:.1f}", 'eigsh converged': f"{int(r.converged.sum())}/{k}",
           'eigsh max rel residual': f"{float((r.residuals / r.eigenvalues.abs().max()).max()):.1e}", 'peak RSS after eigsh (MiB)': round(rss_eigsh),
           'verify=False HVPs': r0.num_matvecs, 'verify=False s': f"{t_nov:.1f}",
           'verify=False max rel diff to eigsh': f"{max(abs(a - b) / abs(a) for a, b in zip(ours, sorted(r0.eigenvalues.tolist()))):.1e}",
           'PyHessian HVPs': calls[0], f'PyHessian s (maxIter={ph_maxiter})': f"{t_ph:.1f}",
           'max rel diff of the values': f"{rel:.1e}", 'time ratio PyHessian/eigsh (verify / not)': f"{t_ph/t_ours:.2f}x / {t_ph/t_nov:.2f}x",
           'eigsh values': ', '.join(f"{e:.4g}" for e in ours), 'PyHessian values': ', '.join(f"{e:.4g}" for e in vals)}
    print(row, flush=True)
    return [row]


def bench_profile(bs, device='cpu', products=12):
    import cProfile, io, pstats, statistics
    from fastsprkd.core import HessianOperator
    from fastsprkd.eigen import eigsh
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product
    model, x, y, lf = setup(bs, device)
    op = HessianOperator(model, lf, (x, y), mode='rev')
    v = torch.randn(op.num_params, device=device)
    h = hessian(model, lf, data=(x, y), cuda=str(device).startswith('cuda'))
    vs = [torch.randn_like(p) for p in h.params]
    def med(fn):
        fn(); ts = []
        for _ in range(3):
            _sync(device); t0 = time.perf_counter(); fn(); _sync(device); ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    t_op, t_ph = med(lambda: op.matvec(v)), med(lambda: hessian_vector_product(h.gradsH, h.params, vs))
    pr = cProfile.Profile(); pr.enable()
    _sync(device); t0 = time.perf_counter()
    eigsh(op, 5, 'LA', tol=1e-3, max_matvecs=products, verify=False, warn=False)
    _sync(device); t = time.perf_counter() - t0
    pr.disable()
    out = io.StringIO(); pstats.Stats(pr, stream=out).sort_stats('tottime').print_stats(8)
    print(out.getvalue())
    row = {'device': _device_name(device), 'matvec s (rev, graph kept)': f"{t_op:.3f}", 'PyHessian hv s': f"{t_ph:.3f}",
           f'eigsh s per product ({products} products)': f"{t / products:.3f}",
           'eigsh overhead per product beyond a matvec': f"{t / products - t_op:.3f}"}
    print(row, flush=True)
    return [row]


def _mem_child(kind, mode, bs, K):
    "Runs in a fresh process: peak RSS before and after one product."
    from fastsprkd.core import HessianOperator
    model, x, y, lf = setup(bs)
    op = HessianOperator(model, lf, (x, y), mode=mode)
    V = torch.randn(op.num_params, K)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if kind == 'matvec': op.matvec(V[:, 0])
    else: op.matmat(V)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_vec = getattr(op, '_per_vec_bytes', None)  # set by the first matmat: the estimated bytes of one vector's tangents
    chunk = max(1, min(K, op.memory_budget // per_vec)) if per_vec else None
    print(json.dumps(dict(kind=kind, mode=mode, K=K if kind == 'matmat' else 1, bs=bs, rss_before_mib=round(base),
                          peak_rss_mib=round(peak), product_s=round(dt, 2), fwd_chunk=chunk,
                          memory_budget_mib=op.memory_budget // 2**20)))


def bench_memory(bs, threads):
    rows = []
    for kind, mode, K in [('matvec', 'rev', 1), ('matvec', 'fwd', 1), ('matmat', 'rev', 8), ('matmat', 'fwd', 8)]:
        out = subprocess.run([sys.executable, __file__, '_mem', kind, mode, str(bs), str(K), '--threads', str(threads)],
                             capture_output=True, text=True, cwd=here)
        if out.returncode: raise RuntimeError(out.stderr[-2000:])
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row); print(row, flush=True)
    return rows


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '_mem':
        torch.set_num_threads(int(sys.argv[sys.argv.index('--threads') + 1]))
        _mem_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    ap = argparse.ArgumentParser()
    ap.add_argument('what', nargs='?', default='all', choices=['hvp', 'eigsh', 'memory', 'profile', 'all'])
    ap.add_argument('--bs', type=int, default=128)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--ph-maxiter', type=int, default=20)
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (the memory bench is CPU-only: peak RSS)")
    ap.add_argument('--compile', action='store_true', help='hvp: also time torch.func jvp(grad), eager and compiled')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = {}
    if a.what in ('memory', 'all') and a.device == 'cpu': res['memory'] = bench_memory(a.bs, a.threads)
    if a.what in ('hvp', 'all'): res['hvp'] = bench_hvp(a.bs, a.repeat, a.device, a.compile)
    if a.what in ('eigsh', 'all'): res['eigsh'] = bench_eigsh(a.bs, a.ph_maxiter, device=a.device)
    if a.what == 'profile': res['profile'] = bench_profile(a.bs, a.device)
    for k, rows in res.items():
        print(f"\n{k}\n" + table(rows, list(rows[0])))
    print(save(f'resnet_{a.what}' + ('' if a.device == 'cpu' else f'_{a.device}'), {k: v for k, v in res.items()}))
