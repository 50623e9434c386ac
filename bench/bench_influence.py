"""Influence at ResNet scale (issue 17): fastsprkd's `influence` by GGN-CG and by EK-FAC, next to kronfluence's EK-FAC
fit + pairwise scores in the same run; wall time and peak memory, one fresh process per contender.

    .venv/bin/python bench/bench_influence.py [--n 2000] [--bs 64] [--threads 2] [--damping 1e-3]
                                              [--cg-tol 1e-3] [--cg-max-iter 10] [--which ggn-cg,ekfac,kronfluence,ggn-pcg]

Model: torchvision `resnet18(weights=None, num_classes=10)` in eval mode (BatchNorm running statistics), float32, CPU
(bench_resnet.py's setup); all 11,181,642 parameters for fastsprkd (EK-FAC: Conv2d/Linear blocks, BatchNorm through its
fallback diagonal), kronfluence's tracked Conv2d/Linear modules (11,172,042; it has no BatchNorm block). Data: the bundled
digits upsampled to 3×32×32: the first 1,700 and then their mirror images (for `--n` above 1,700), `--n` training images
in unshuffled batches of `--bs`; one test image (the last digit, not among them); cross-entropy.
Damping `--damping` (absolute, on the mean loss's curvature) for all three, so that they solve the same kind of system.

What is timed (wall clock inside the child, after building the model and the data):
ggn-cg       `influence(model, lf, batches, test, curvature='ggn', method='cg', damping=, tol=--cg-tol,
             max_iter=--cg-max-iter)`: the test gradient, CG on the GGN of all 2,000 images (each product is a pass over
             all batches), the rows as forward-mode directional derivatives. Its residual/iterations are reported.
ggn-pcg      ggn-cg preconditioned by the EK-FAC inverse (`preconditioner=EKFACOperator(..., fisher_type='mc').inverse(damping)`,
             its fit timed too).
ekfac        `influence(..., curvature='ekfac', damping=, operator_kwargs=dict(fisher_type='mc'))`: EKFACOperator's fit
             (one sampled label per image, as kronfluence's default true Fisher), its exact inverse, the rows.
ekfac-f64    the same with the model and the data in float64 (EKFACOperator eigendecomposes its factors in the model's
             dtype; in float32 `torch.linalg.eigh` fails on ResNet-18's rank-deficient layer4 input factors).
kronfluence  `Analyzer.fit_all_factors` (strategy 'ekfac', its defaults: sampled labels, float64 eigendecomposition) +
             `compute_pairwise_scores` (damping_factor=--damping) on the same batches, factors and scores written to a
             temporary directory (its design). Reported apart: fit and score.
Peak memory: the child's peak RSS (getrusage ru_maxrss), including torch/torchvision imports and the data.
Scores are compared across contenders by Spearman rank correlation (kronfluence's sign: its score is −I_up,loss).
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time
import torch
from torch import nn

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from common import save, table, machine, kronfluence_ce_task

CONTENDERS = ['ggn-cg', 'ekfac', 'kronfluence']  # and 'ekfac-f64': EK-FAC with the model and data in float64


def setup(n):
    import torchvision
    from fastsprkd.data import digits_tensors
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x, y = digits_tensors()
    x = nn.functional.interpolate(x, size=(32, 32), mode='bilinear', align_corners=False).expand(-1, 3, -1, -1).contiguous()
    xte, yte = x[-1:], y[-1:]  # the test image: the last digit, outside the training images below
    xtr, ytr = torch.cat([x[:-97], x[:-97].flip(-1)]), torch.cat([y[:-97], y[:-97]])  # 1,700 digits, then their mirror images
    if n > len(xtr): raise ValueError(f'--n must be at most {len(xtr)}')
    return model, xtr[:n].contiguous(), ytr[:n].contiguous(), xte, yte, nn.CrossEntropyLoss()


def child(name, a):
    torch.set_num_threads(a.threads)
    model, xtr, ytr, xte, yte, lf = setup(a.n)
    if name.endswith('-f64'): model, xtr, xte = model.double(), xtr.double(), xte.double()
    batches = [(xtr[i:i+a.bs], ytr[i:i+a.bs]) for i in range(0, a.n, a.bs)]
    row = dict(contender=name)
    if name == 'kronfluence':
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.utils.dataset import DataLoaderKwargs
        task = kronfluence_ce_task()
        model = prepare_model(model, task)
        tr, te = torch.utils.data.TensorDataset(xtr, ytr), torch.utils.data.TensorDataset(xte, yte)
        with tempfile.TemporaryDirectory() as d:
            an = Analyzer('bench', model, task, cpu=True, disable_tqdm=True, output_dir=d, log_level=40)
            dk = DataLoaderKwargs(num_workers=0)
            t0 = time.perf_counter()
            an.fit_all_factors(factors_name='f', dataset=tr, per_device_batch_size=a.bs, factor_args=FactorArguments(strategy='ekfac'),
                               overwrite_output_dir=True, dataloader_kwargs=dk)
            t1 = time.perf_counter()
            an.compute_pairwise_scores(scores_name='s', factors_name='f', query_dataset=te, train_dataset=tr, per_device_query_batch_size=1,
                                       per_device_train_batch_size=a.bs, score_args=ScoreArguments(damping_factor=a.damping),
                                       overwrite_output_dir=True, dataloader_kwargs=dk)
            t2 = time.perf_counter()
            scores = -an.load_pairwise_scores('s')['all_modules'][0].double()  # kronfluence's score = −I_up,loss
        row.update(fit_s=round(t1 - t0, 1), score_s=round(t2 - t1, 1), total_s=round(t2 - t0, 1))
    else:
        from fastsprkd.analysis import influence
        from fastsprkd.kfac import EKFACOperator
        t0 = time.perf_counter()
        kw = (dict(curvature='ggn', method='cg', tol=a.cg_tol, max_iter=a.cg_max_iter) if name.startswith('ggn-')
              else dict(curvature='ekfac', operator_kwargs=dict(fisher_type='mc')))
        if name == 'ggn-pcg':  # its EK-FAC fit (one sampled label per image) inside the timing
            kw['preconditioner'] = EKFACOperator(model, lf, batches, fisher_type='mc').inverse(a.damping)
        with __import__('warnings').catch_warnings(record=True):  # CG stopped at max_iter warns; reported below
            res = influence(model, lf, batches, (xte, yte), damping=a.damping, **kw)
        row['total_s'] = round(time.perf_counter() - t0, 1)
        row.update(residual=f"{res.residual:.2e}", iterations=res.iterations, converged=res.converged, products=res.num_matvecs)
        scores = res.scores[:, 0].double()
    row['peak_rss_GiB'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    torch.save(scores, os.path.join(a.tmp, f'{name}.pt'))
    print(json.dumps(row))


def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=2000)
    ap.add_argument('--bs', type=int, default=64)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--damping', type=float, default=1e-3)
    ap.add_argument('--cg-tol', type=float, default=1e-3)
    ap.add_argument('--cg-max-iter', type=int, default=10)
    ap.add_argument('--which', default=','.join(CONTENDERS))
    ap.add_argument('--child', default=None)
    ap.add_argument('--tmp', default=None)
    a = ap.parse_args()
    if a.child: child(a.child, a); sys.exit(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.which.split(','):
            cmd = [sys.executable, __file__, '--child', name, '--tmp', tmp] + [f'--{k.replace("_", "-")}={v}' for k, v in vars(a).items()
                                                                                  if k not in ('child', 'tmp', 'which')]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=here)
            if out.returncode:  # reported, not hidden: the row says what failed
                err = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f'exit {out.returncode}'
                row = dict(contender=name, total_s='failed', error=err[:300])
            else: row = json.loads(out.stdout.strip().splitlines()[-1])
            row['process_s'] = round(time.perf_counter() - t0, 1)
            rows.append(row); print(row, flush=True)
        sc = {r['contender']: torch.load(os.path.join(tmp, f"{r['contender']}.pt")) for r in rows if 'error' not in r}
    names = list(sc)
    rank = [dict(pair=f'{p} vs {q}', spearman=f'{spearman(sc[p], sc[q]):.3f}') for i, p in enumerate(names) for q in names[i+1:]]
    cols = ['contender', 'total_s', 'fit_s', 'score_s', 'peak_rss_GiB', 'residual', 'iterations', 'converged', 'products', 'process_s']
    errors = [f"{r['contender']}: {r['error']}" for r in rows if 'error' in r]
    print(f'\n{machine()}, load {os.getloadavg()}\n' + table(rows, cols) + ''.join(f'\n{e}' for e in errors) + '\n\n' + (table(rank, ['pair', 'spearman']) if rank else ''))
    print(save('influence', dict(args=vars(a), rows=rows, rank=rank)))
