"""Calibration of the standard errors that `trace` and `diagonal` report, on dense matrices with known spectra.

    .venv/bin/python bench/bench_stderr.py [--seeds 200] [--n 300] [--digits]

For each spectrum (n×n, a fixed random eigenbasis) and budget m of operator products, over `--seeds` probe seeds:
ratio = RMS(estimate − exact) / RMS(reported stderr) (1 is honest; above 1 the error bar is too small) and
cover = the fraction of |estimate − exact| ≤ 2·stderr (≈ 0.95 for a Gaussian error with an honest stderr).
XDiag is per entry, pooled over entries and seeds; [lo, hi] is the range over entries of the per-entry ratio
(entries whose stderr is 0 in every seed are left out of the range).
A second table runs `trace(method='xtrace', rtol=...)`: the stop rule stops on the stderr, so a too-small stderr
stops too soon and the achieved error exceeds the requested one.
--digits adds the Hessian of bench_estimators' digits CNN (DigitsCNN(8), 1,898 parameters, 300 Adam steps on 512
bundled digits images; dense float64 from `HessianOperator.to_dense`) as a DenseOperator, at 30 and 100 products.
Only the public API is used, so the same script measures another checkout (PYTHONPATH=that checkout).
"""
import sys, math, time
import torch
from fastsprkd.curvature.base import DenseOperator
from fastsprkd.estimators import trace, diagonal

torch.set_num_threads(1)
arg = lambda name, default: type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default
SEEDS, N = arg('--seeds', 200), arg('--n', 300)


def spectra(n):
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    k = torch.arange(1, n + 1, dtype=torch.float64)
    lams = {'flat U[0.5,1.5]': 0.5 + torch.rand(n, generator=g, dtype=torch.float64),
            'poly k^-1': 1 / k, 'poly k^-2': k ** -2, 'exp 0.9^k': 0.9 ** k,
            'indefinite (10/k top 10, N(0,0.05²) bulk)': torch.cat([10 / k[:10], 0.05 * torch.randn(n - 10, generator=g, dtype=torch.float64)]),
            'rank 10 (λ=10) + Wigner noise 0.05': torch.cat([torch.full((10,), 10., dtype=torch.float64), torch.zeros(n - 10, dtype=torch.float64)])}
    out = {}
    for name, lam in lams.items():
        A = U @ torch.diag(lam) @ U.T
        if name.startswith('rank'):
            G = torch.randn(n, n, generator=g, dtype=torch.float64); A = A + 0.05 * (G + G.T) / math.sqrt(2 * n)
        out[name] = (A + A.T) / 2
    return out


def digits_hessian():
    from torch import nn
    from fastsprkd.core import HessianOperator
    from fastsprkd.models import DigitsCNN
    from fastsprkd.data import digits_tensors
    torch.manual_seed(0)
    x, y = digits_tensors(); x, y = x[:512], y[:512]
    model = DigitsCNN(8)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(300):
        opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    model.eval(); model.zero_grad(set_to_none=True)
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense().double()
    return (H + H.T) / 2


def calib(err, se):
    return (err.pow(2).mean().sqrt() / se.pow(2).mean().sqrt()).item(), (err.abs() <= 2 * se).double().mean().item()


def main():
    t0 = time.time()
    print(f"n = {N}, {SEEDS} seeds; each cell: ratio RMS(error)/RMS(stderr) / coverage of ±2·stderr\n")
    print("| spectrum | m | Hutchinson | Hutch++ | XTrace | XDiag (pooled) | XDiag per-entry ratio [lo, hi] |")
    print("|---|---|---|---|---|---|---|")
    mats = spectra(N)
    if '--digits' in sys.argv: mats = {**mats, 'digits CNN Hessian (n = 1,898)': digits_hessian()}
    for name, A in mats.items():
        op, tr, d = DenseOperator(A), A.trace().item(), A.diagonal()
        for m in ((30, 100) if name.startswith('digits') else (20, 40, 80)):
            cells = []
            for meth in ('hutchinson', 'hutch++', 'xtrace'):
                es = [trace(op, method=meth, num_matvecs=m, seed=s) for s in range(SEEDS)]
                cells.append(calib(torch.tensor([e.estimate - tr for e in es]), torch.tensor([e.stderr for e in es])))
            ds = [diagonal(op, method='xdiag', num_matvecs=m, seed=s) for s in range(SEEDS)]
            err, se = torch.stack([x.estimate for x in ds]) - d, torch.stack([x.stderr for x in ds])
            cells.append(calib(err, se))
            keep = se.pow(2).mean(0) > 0  # entries of exactly 0 (a dead parameter's Hessian row) have error and stderr 0
            per = err[:, keep].pow(2).mean(0).sqrt() / se[:, keep].pow(2).mean(0).sqrt()
            print(f"| {name} | {m} | " + " | ".join(f"{r:.2f} / {c:.2f}" for r, c in cells)
                  + f" | [{per.min().item():.2f}, {per.max().item():.2f}] |", flush=True)
    print("\nXTrace with the stop rule: trace(method='xtrace', num_matvecs=400, rtol=r, batch=10)\n")
    print("| spectrum | rtol | mean products | RMS(relative error) / rtol | coverage of ±2·stderr |")
    print("|---|---|---|---|---|")
    for name, rtol in (('poly k^-1', 0.01), ('exp 0.9^k', 1e-4), ('flat U[0.5,1.5]', 0.005)):
        A = mats[name]; tr = A.trace().item()
        es = [trace(A, method='xtrace', num_matvecs=400, rtol=rtol, batch=10, seed=s) for s in range(SEEDS)]
        err = torch.tensor([e.estimate - tr for e in es])
        _, cover = calib(err, torch.tensor([e.stderr for e in es]))
        print(f"| {name} | {rtol:g} | {sum(e.num_matvecs for e in es) / len(es):.0f} | "
              f"{(err / abs(tr)).pow(2).mean().sqrt().item() / rtol:.2f} | {cover:.2f} |", flush=True)
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == '__main__': main()
