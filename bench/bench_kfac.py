"""K-FAC and EK-FAC factor fitting on ResNet-18 (issue 17): fastsprkd's `KFACOperator`/`EKFACOperator` next to curvlinops'
`KFACLinearOperator`/`EKFACLinearOperator` and kronfluence's factor fitting, in the same run.

    .venv/bin/python bench/bench_kfac.py [--n 512] [--bs 128] [--repeat 3] [--threads 2] [--device cpu|cuda]
                                         [--which kfac,ekfac] [--fisher mc]

Model: torchvision `resnet18(weights=None, num_classes=10)` in eval mode, float32; data: the bundled digits upsampled to
3×32×32 (bench_resnet.py's `setup`), `--n` images in batches of `--bs`, cross-entropy (mean). Parameters: the Conv2d and
Linear weights and biases (11.17M; the BatchNorm parameters are left out because curvlinops refuses them); the row
`fastsprkd K-FAC, all parameters` adds them through the fallback diagonal. Labels: `--fisher mc` (one label drawn
from the model per sample, kronfluence's default `use_empirical_fisher=False`) for every contender.

What is timed (wall clock, inside a fresh process per contender and round; rounds interleave the contenders):
K-FAC   fastsprkd: `KFACOperator(...)` (one sweep: input and output-gradient covariances);
        curvlinops: `KFACLinearOperator(..., separate_weight_and_bias=False, num_data=n)` + `compute_kronecker_factors()`;
        kronfluence: `Analyzer.fit_covariance_matrices` (strategy 'ekfac'; it also writes the factors to disk).
EK-FAC  fastsprkd: `EKFACOperator(...)` (covariances, eigh of every factor, the eigenvalue-correction sweep);
        curvlinops: `EKFACLinearOperator(...)` + `compute_kronecker_factors()` + `compute_eigenvalue_correction()`;
        kronfluence: `Analyzer.fit_all_factors` (strategy 'ekfac': covariances, eigendecomposition in float64 — its
        default `eigendecomposition_dtype` — and the lambda sweep; written to disk).
Peak memory: the process' peak RSS (getrusage) on the CPU, `torch.cuda.max_memory_allocated` on a GPU.
"""
import argparse, json, os, resource, statistics, subprocess, sys, tempfile, time
import torch
from torch import nn

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from common import save, table, machine, kronfluence_ce_task

CONTENDERS = {'kfac': ['fastsprkd K-FAC', 'curvlinops K-FAC', 'kronfluence covariances', 'fastsprkd K-FAC, all parameters'],
              'ekfac': ['fastsprkd EK-FAC', 'curvlinops EK-FAC', 'kronfluence EK-FAC']}


def setup(n, device):
    import torchvision
    from fastsprkd.data import digits_tensors
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval().to(device)
    x, y = digits_tensors()
    x = nn.functional.interpolate(x[:n], size=(32, 32), mode='bilinear', align_corners=False).expand(-1, 3, -1, -1).contiguous()
    return model, x.to(device), y[:n].to(device), nn.CrossEntropyLoss()


def kron_params(model):
    return [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters()]


def one(name, n, bs, device, fisher):
    "Fit one contender's factors; returns (seconds, peak bytes)."
    model, x, y, lf = setup(n, device)
    data = [(x[i:i+bs], y[i:i+bs]) for i in range(0, n, bs)]
    ps = kron_params(model)
    sync = (lambda: torch.cuda.synchronize()) if device.startswith('cuda') else (lambda: None)
    if device.startswith('cuda'): torch.cuda.reset_peak_memory_stats()
    if name.startswith('kronfluence'):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.utils.dataset import DataLoaderKwargs
        task = kronfluence_ce_task()
        model = prepare_model(model, task)
        ds = torch.utils.data.TensorDataset(x.cpu(), y.cpu())
        with tempfile.TemporaryDirectory() as d:
            an = Analyzer('bench', model, task, cpu=not device.startswith('cuda'), disable_tqdm=True, output_dir=d, log_level=40)
            fa = FactorArguments(strategy='ekfac', use_empirical_fisher=fisher == 'empirical')
            kw = dict(factors_name='f', dataset=ds, per_device_batch_size=bs, factor_args=fa, overwrite_output_dir=True,
                      dataloader_kwargs=DataLoaderKwargs(num_workers=0))
            sync(); t0 = time.perf_counter()
            (an.fit_covariance_matrices if 'covariances' in name else an.fit_all_factors)(**kw)
            sync(); t = time.perf_counter() - t0
    else:
        sync(); t0 = time.perf_counter()
        if name.startswith('fastsprkd'):
            from fastsprkd.kfac import KFACOperator, EKFACOperator
            cls = EKFACOperator if 'EK-FAC' in name else KFACOperator
            op = cls(model, lf, data, None if 'all parameters' in name else ps, fisher_type=fisher)
        else:
            import curvlinops
            cls = curvlinops.EKFACLinearOperator if 'EK-FAC' in name else curvlinops.KFACLinearOperator
            op = cls(model, lf, ps, data, fisher_type=fisher, separate_weight_and_bias=False, check_deterministic=False,
                     num_data=n, num_per_example_loss_terms=1)
            op.compute_kronecker_factors()
            if 'EK-FAC' in name: op.compute_eigenvalue_correction()
        sync(); t = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.startswith('cuda') else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return t, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=512); ap.add_argument('--bs', type=int, default=128)
    ap.add_argument('--repeat', type=int, default=3); ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--device', default='cpu'); ap.add_argument('--which', default='kfac,ekfac')
    ap.add_argument('--fisher', default='mc', choices=['mc', 'empirical'])
    ap.add_argument('--one', default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.one is not None:
        t, peak = one(a.one, a.n, a.bs, a.device, a.fisher)
        print(json.dumps(dict(t=t, peak=peak))); return
    names = [c for w in a.which.split(',') for c in CONTENDERS[w]]
    res = {c: [] for c in names}
    for r in range(a.repeat):
        for c in names:
            cmd = [sys.executable, __file__, '--one', c, '--n', str(a.n), '--bs', str(a.bs), '--threads', str(a.threads),
                   '--device', a.device, '--fisher', a.fisher]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
            if out.returncode != 0:  # a contender that fails (e.g. float32 eigh not converging) is reported, not fatal
                err = [l for l in out.stderr.strip().splitlines() if l.strip()][-1][:200]
                res[c].append(dict(error=err))
                print(f"round {r + 1}: {c}: failed: {err}", file=sys.stderr, flush=True)
                continue
            res[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {c}: {res[c][-1]['t']:.2f} s, peak {res[c][-1]['peak'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    rows = []
    ok = {c: [o for o in res[c] if 't' in o] for c in names}
    for c in names:
        if not ok[c]:
            rows.append({'contender': c, 'median s': 'failed', 'rounds (s)': res[c][0]['error']}); continue
        ts = [o['t'] for o in ok[c]]
        base = 'fastsprkd EK-FAC' if 'EK' in c else 'fastsprkd K-FAC'
        bt = statistics.median(o['t'] for o in ok[base]) if ok.get(base) else None
        med = statistics.median(ts)
        rows.append({'contender': c, 'median s': f"{med:.2f}", 'rounds (s)': ', '.join(f"{t:.1f}" for t in ts),
                     'peak GiB (median)': f"{statistics.median(o['peak'] for o in ok[c]) / 2**30:.2f}",
                     'time / fastsprkd': f"{med / bt:.2f}" if bt else ''})
    print(f"ResNet-18, {a.n} images 3x32x32, batch {a.bs}, fisher {a.fisher}, {a.device}, {a.threads} threads, {a.repeat} rounds")
    print(table(rows, ['contender', 'median s', 'time / fastsprkd', 'peak GiB (median)', 'rounds (s)']))
    save(f'bench_kfac_{a.device}', dict(args=vars(a), rows=rows, raw=res, machine=machine()))


if __name__ == '__main__': main()
