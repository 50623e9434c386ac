"""When may Lanczos from a random start stop before its first Krylov basis is full? (issue 3)

    .venv/bin/python bench/sim_eigsh_stop.py [seeds=16]

Runs `eigsh(A, k, which, tol, verify=False)` on dense symmetric matrices (n = 300, eigenvectors a random orthogonal
basis) with four spectrum families that have a bulk and outliers at both ends, for k = 1, 2, 5, which = 'LA', 'SA',
'BE' and tol = 1e-2, 1e-3, 1e-4, 1e-6, under three stopping rules for a random start:
  fill:    never stop before the first basis (ncv vectors) is full (ARPACK's rule);
  default: stop earlier only when the wanted pairs meet the tighter of tol and 1e-4, after ≥ 2k+1 products;
  loose:   stop earlier as soon as the wanted pairs meet tol, after ≥ 2k+1 products.
A solve is wrong when a returned eigenvalue differs from the wanted one by more than 3·tol·‖A‖.
"""
import sys, itertools
import torch
import fastsprkd.eigen as E

F64 = torch.float64
RULES = {'fill': 0.0, 'default': 1e-4, 'loose': 1.0}


def spectra(n, seed):
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(1, n + 1, dtype=F64)
    return [  # outliers above a narrow bulk and small negatives below it (the SaddleCaptureCallback's case)
            torch.cat([torch.tensor([7., 4., 2.]), torch.rand(n - 5, generator=g) * 0.02 - 0.01, torch.tensor([-0.158, -0.12])]).to(F64),
            # Hessian-like: a power-law positive tail, a bulk around 0, a few small negative eigenvalues
            torch.cat([10 * i[:20] ** -1.5, torch.randn(n - 26, generator=g, dtype=F64) * 0.005, -0.05 * torch.rand(6, generator=g, dtype=F64) - 0.01]),
            # clustered top eigenvalues above a wide bulk
            torch.cat([torch.tensor([1.2, 1.1, 1.05, 0.97, 0.93, 0.9, 0.86]), torch.rand(n - 10, generator=g) * 0.4, torch.tensor([-0.3, -0.25, -0.2])]).to(F64),
            # a Gaussian bulk with outliers at both ends
            torch.cat([torch.tensor([5., 3.]), torch.randn(n - 4, generator=g) * 0.1, torch.tensor([-1., -0.6])]).to(F64)]


def wanted(evs, k, which):
    n = evs.shape[0]
    if which == 'LA': return evs[n - k:]
    if which == 'SA': return evs[:k]
    return torch.cat([evs[:k // 2], evs[n - (k - k // 2):]])


def main(seeds=16, n=300):
    wrong = {r: 0 for r in RULES}; products = {r: 0 for r in RULES}; total = 0
    per_tol = {}
    for seed in range(seeds):
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1000 + seed), dtype=F64))
        for ev in spectra(n, seed):
            A, evs = (Q * ev) @ Q.T, torch.sort(ev).values
            for k, which, tol in itertools.product([1, 2, 5], ['LA', 'SA', 'BE'], [1e-2, 1e-3, 1e-4, 1e-6]):
                total += 1
                for rule, early in RULES.items():
                    E._EARLY_TOL = early
                    r = E.eigsh(A, k, which, tol=tol, seed=seed, verify=False)
                    bad = bool((r.eigenvalues - wanted(evs, k, which)).abs().max() > 3 * tol * evs.abs().max())
                    wrong[rule] += bad; products[rule] += r.num_matvecs
                    per_tol.setdefault((rule, tol), [0, 0]); per_tol[(rule, tol)][0] += bad; per_tol[(rule, tol)][1] += r.num_matvecs
    E._EARLY_TOL = RULES['default']
    print(f'{total} solves per rule ({seeds} seeds)\n')
    print('| rule | wrong | mean products | ' + ' | '.join(f'wrong / mean products at tol {t:g}' for t in (1e-2, 1e-3, 1e-4, 1e-6)) + ' |')
    print('|---|---|---|---|---|---|---|')
    for rule in RULES:
        cells = [f'{per_tol[(rule, t)][0]} / {per_tol[(rule, t)][1] / (total / 4):.1f}' for t in (1e-2, 1e-3, 1e-4, 1e-6)]
        print(f'| {rule} | {wrong[rule]} | {products[rule] / total:.1f} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    torch.set_num_threads(1)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
