"""Influence against exact leave-one-out (LOO) retraining on a non-convex digits CNN (issue 17's acceptance).

Procedure (Koh & Liang 2017, §5.1, with retraining to convergence instead of a fixed number of steps):
- model: `TanhDigitsCNN`, Conv(1→2)–tanh–avg-pool–Conv(2→4)–tanh–avg-pool–Linear(16→10), 266 parameters, float64
  (smooth, so that "trained to a small gradient" is well posed);
- data: 1,400 bundled digits (the permutation of tests/test_influence_convex.py), the other 397 as test images;
- objective: mean cross-entropy + (WD/2)·‖θ‖², WD = 5e-3, trained full-batch (Adam, L-BFGS, then Newton's method with the
  exact Hessian) to max |∇| ≤ 1e-10, at a point whose Hessian is positive definite (a strict local minimum);
- two test points: those at the 97th and 90th percentile of the test loss;
- the documented configuration: `influence(model, loss_func, train, test, damping=WD)`, i.e. the exact Hessian of the
  training objective (the loss's Hessian plus the weight decay's WD·I) by CG;
- for each test point the 30 training points of largest |influence|, each removed and the model retrained from the
  optimum (warm start) on (1/N)·Σ_{k≠i} ℓ_k + (WD/2)·‖θ‖² by BFGS started from the exact Hessian of that objective, to
  max |∇| ≤ 1e-9; predicted change of the test loss −I_up,loss/N, actual = retrained − optimal test loss; Pearson r.

Measured (2026-12-02, `pytest -s` prints them; the whole file takes about 75–110 s on the 2-core CPU):
  influence(damping=WD), the documented configuration   r = 0.995 / 0.990   (issue: ≥ 0.86, Koh & Liang's CNN figure)
  kronfluence 1.0.1 EK-FAC, damping WD / its heuristic   r = 0.793 / 0.655, 0.792 / 0.697
  damping=None (the spectrum rule, 0.0129)               r = 0.898 / 0.825
  curvature='ggn', damping=WD                            r = 0.861 / 0.838
  curvature='ekfac', damping=WD                          r = 0.791 / 0.662
  params=model.fc (last layer only), damping=WD          r = 0.792 / 0.777
Seeds 1–3 of the initialization (not run here): r = 0.999 / 0.997, 1.000 / 1.000, 1.000 / 1.000.
Why this model and not a wider one: the LOO change is predicted by a first-order expansion around the optimum, which holds
only when removing one point perturbs the Hessian little against its smallest eigenvalue. With width 4 and WD = 1e-3
(λ_min 4e-5) removals of influential points made the objective's Hessian indefinite and the retrained optimum moved far
(r = 0.80 / 0.47 for the same configuration); `bench/influence_loo.py` measures that dependence.
"""
import os, sys, time, tempfile, warnings
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap
from fastsprkd.data import digits_tensors
from fastsprkd.analysis import influence

D = torch.float64
N_TRAIN, WD, WIDTH, TOP = 1400, 5e-3, 2, 30
TRAIN_TOL, LOO_TOL = 1e-10, 1e-9
REPORT = {}


class TanhDigitsCNN(nn.Module):
    "A small smooth CNN for 8×8 digits: Conv(1→w)–tanh–avg-pool–Conv(w→2w)–tanh–avg-pool–Linear(4w→10)."
    def __init__(self, width=WIDTH):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, width, 3, padding=1), nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(8 * width, 10)
    def forward(self, x):
        x = F.avg_pool2d(torch.tanh(self.conv1(x)), 2)
        return self.fc(F.avg_pool2d(torch.tanh(self.conv2(x)), 2).flatten(1))


def pearson(a, b): return torch.corrcoef(torch.stack([torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D)]))[0, 1].item()


class Problem:
    "The regularized full-batch training problem in flat parameters; `w` weights the training points (0 removes one)."
    def __init__(self, n_train=N_TRAIN, wd=WD, width=WIDTH, seed=0):
        x, y = digits_tensors()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x = x.double()
        self.n, self.wd = n_train, wd
        self.Xtr, self.Ytr, self.Xte, self.Yte = x[perm[:n_train]], y[perm[:n_train]], x[perm[n_train:]], y[perm[n_train:]]
        torch.manual_seed(seed)
        self.model = TanhDigitsCNN(width).double()
        ps = dict(self.model.named_parameters())
        self.names, self.shapes, self.sizes = list(ps), [p.shape for p in ps.values()], [p.numel() for p in ps.values()]
        self.grad = grad(self.objective)
    def unflat(self, th): return dict(zip(self.names, [t.view(s) for t, s in zip(th.split(self.sizes), self.shapes)]))
    def flat(self): return torch.cat([p.detach().flatten() for p in self.model.parameters()])
    def losses(self, th, x, y): return F.cross_entropy(functional_call(self.model, self.unflat(th), (x,)), y, reduction='none')
    def objective(self, th, w=None):
        l = self.losses(th, self.Xtr, self.Ytr)
        return (l.mean() if w is None else (w * l).sum() / self.n) + self.wd / 2 * th.pow(2).sum()
    def jacobian(self, f, th, chunk=64):
        "Dense Jacobian of the gradient map `f` (a Hessian) by forward-over-reverse products, `chunk` columns at a time."
        E = torch.eye(len(th), dtype=D)
        return torch.cat([vmap(lambda v: jvp(f, (th,), (v,))[1])(E[i:i+chunk]) for i in range(0, len(th), chunk)]).T.contiguous()
    def hessian(self, th, w=None): return self.jacobian(lambda t: self.grad(t, w), th)
    def point_hessian(self, th, i):
        "Hessian of training point i's loss (not divided by N)."
        return self.jacobian(grad(lambda t: self.losses(t, self.Xtr[i:i+1], self.Ytr[i:i+1]).sum()), th)
    def test_loss(self, th, j): return self.losses(th, self.Xte[j:j+1], self.Yte[j:j+1]).item()
    def load(self, th):
        with torch.no_grad():
            for p, v in zip(self.model.parameters(), self.unflat(th).values()): p.copy_(v)

    def train(self, adam=300, lbfgs=1000, newton=8):
        "Adam, L-BFGS, then Newton's method with the exact Hessian to max |∇| ≤ TRAIN_TOL; sets `theta`, `H`, `gmax`."
        th = self.flat().requires_grad_(True)
        opt = torch.optim.Adam([th], lr=0.02)
        for _ in range(adam):
            opt.zero_grad(); self.objective(th).backward(); opt.step()
        opt = torch.optim.LBFGS([th], lr=1, max_iter=lbfgs, max_eval=lbfgs, tolerance_grad=1e-7, tolerance_change=0,
                                history_size=100, line_search_fn='strong_wolfe')
        def closure():
            opt.zero_grad(); l = self.objective(th); l.backward(); return l
        opt.step(closure)
        th = th.detach()
        for _ in range(newton):
            H, g = self.hessian(th), self.grad(th)
            if g.abs().max() <= TRAIN_TOL: break
            th = th - torch.linalg.solve(H, g)
        self.theta, self.H, self.gmax = th, H, self.grad(th).abs().max().item()
        self.load(th)
        return self

    def retrain_without(self, i, max_iter=200):
        """Remove training point i and retrain from the optimum: BFGS (inverse update, Armijo backtracking) started from
        the exact Hessian of the LOO objective at the optimum. Returns (θ, max |∇|, λ_min of that starting Hessian)."""
        w = torch.ones(self.n, dtype=D); w[i] = 0
        B = self.H - self.point_hessian(self.theta, i) / self.n
        lmin = torch.linalg.eigvalsh(B)[0].item()
        Binv = torch.linalg.inv(B if lmin > 0 else self.H)
        th, g, f = self.theta.clone(), self.grad(self.theta, w), self.objective(self.theta, w).item()
        I = torch.eye(len(th), dtype=D)
        for _ in range(max_iter):
            if g.abs().max() <= LOO_TOL: break
            p, a = -Binv @ g, 1.0
            while True:
                th2 = th + a * p
                f2 = self.objective(th2, w).item()
                if f2 <= f + 1e-4 * a * (g @ p).item() or a < 1e-10: break
                a /= 2
            g2 = self.grad(th2, w)
            s, y = th2 - th, g2 - g
            if (s @ y).item() > 0:
                rho = 1 / (s @ y).item(); V = I - rho * torch.outer(s, y)
                Binv = V @ Binv @ V.T + rho * torch.outer(s, s)
            th, g, f = th2, g2, f2
        return th, g.abs().max().item(), lmin

    def test_points(self):
        "The test points at the 97th and 90th percentile of the test loss."
        with torch.no_grad(): lt = self.losses(self.theta, self.Xte, self.Yte)
        order = lt.argsort()
        return [order[int(len(order) * 0.97)].item(), order[int(len(order) * 0.90)].item()]

    def loo(self, scores, js, top=TOP):
        """For each test point (column of `scores`): its top-|score| training points and their actual LOO test-loss changes;
        with the worst retraining's max |∇| and each LOO objective's λ_min at the optimum (all test points' points in order)."""
        tops, actual, gmax, lmins = [], [], [], []
        for c, j in enumerate(js):
            idx = scores[:, c].abs().argsort(descending=True)[:top]
            base, a = self.test_loss(self.theta, j), []
            for i in idx.tolist():
                th_i, gm, lm = self.retrain_without(i)
                gmax.append(gm); lmins.append(lm); a.append(self.test_loss(th_i, j) - base)
            tops.append(idx); actual.append(torch.tensor(a, dtype=D))
        return tops, actual, max(gmax), lmins

    def r(self, scores, tops, actual):
        "Pearson r of the predicted change −I/N against the actual one, per test point, on the retrained points."
        return [pearson(-scores[t, c] / self.n, a) for c, (t, a) in enumerate(zip(tops, actual))]


def kronfluence_scores(pb, js, damping, tmp):
    "kronfluence's pairwise EK-FAC scores (n_train × len(js)), float64, as I_up,loss (its score is −I_up,loss)."
    import copy
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'bench'))
    from common import kronfluence_ce_task  # the benchmarks' kronfluence Task (summed cross-entropy, sampled labels)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    task = kronfluence_ce_task()
    model = prepare_model(copy.deepcopy(pb.model), task)
    tr = torch.utils.data.TensorDataset(pb.Xtr, pb.Ytr)
    te = torch.utils.data.TensorDataset(pb.Xte[js], pb.Yte[js])
    an = Analyzer('loo', model, task, cpu=True, disable_tqdm=True, output_dir=tmp, log_level=40)
    dk = DataLoaderKwargs(num_workers=0)
    f64 = dict(activation_covariance_dtype=D, gradient_covariance_dtype=D, per_sample_gradient_dtype=D, lambda_dtype=D)
    an.fit_all_factors(factors_name='f', dataset=tr, per_device_batch_size=pb.n, factor_args=FactorArguments(strategy='ekfac', **f64),
                       overwrite_output_dir=True, dataloader_kwargs=dk)
    out = {}
    for label, dmp in damping.items():
        an.compute_pairwise_scores(scores_name=label, factors_name='f', query_dataset=te, train_dataset=tr, per_device_query_batch_size=len(js),
                                   per_device_train_batch_size=pb.n, overwrite_output_dir=True, dataloader_kwargs=dk,
                                   score_args=ScoreArguments(damping_factor=dmp, per_sample_gradient_dtype=D, precondition_dtype=D, score_dtype=D))
        out[label] = -an.load_pairwise_scores(label)['all_modules'].double().T
    return out


# the documented configuration first (its top-30 points are the ones retrained), then the reported ones
CONFIGS = {'hessian, damping=WD': lambda pb: dict(damping=WD),
           'hessian, damping rule': lambda pb: dict(),
           'ggn, damping=WD': lambda pb: dict(curvature='ggn', damping=WD),
           'ekfac, damping=WD': lambda pb: dict(curvature='ekfac', damping=WD),
           'last layer, damping=WD': lambda pb: dict(params=pb.model.fc, damping=WD)}
DOCUMENTED = 'hessian, damping=WD'


@pytest.fixture(scope='module')
def trained():
    t0 = time.perf_counter()
    pb = Problem().train()
    pb.js = pb.test_points()
    with torch.no_grad(): pb.acc = (pb.model(pb.Xte).argmax(1) == pb.Yte).double().mean().item()
    pb.lmin = torch.linalg.eigvalsh(pb.H)[0].item()
    REPORT['train'] = dict(seconds=round(time.perf_counter() - t0, 1), gmax=f'{pb.gmax:.1e}', lmin=f'{pb.lmin:.2e}', test_acc=round(pb.acc, 3))
    return pb


@pytest.fixture(scope='module')
def scores(trained):
    pb, out = trained, {}
    for name, kw in CONFIGS.items():
        res = influence(pb.model, nn.CrossEntropyLoss(), (pb.Xtr, pb.Ytr), (pb.Xte[pb.js], pb.Yte[pb.js]), **kw(pb))
        out[name] = res
    return out


@pytest.fixture(scope='module')
def loo(trained, scores):
    t0 = time.perf_counter()
    out = trained.loo(scores[DOCUMENTED].scores, trained.js)
    REPORT['LOO retraining'] = dict(seconds=round(time.perf_counter() - t0, 1), worst_gmax=f'{out[2]:.1e}', min_lmin=f'{min(out[3]):.2e}')
    return out


@pytest.fixture(scope='module')
def kron(trained):
    pytest.importorskip('kronfluence', reason='kronfluence is not installed: the comparison with it is skipped')
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return kronfluence_scores(trained, trained.js, {'damping WD': WD, 'damping heuristic': None}, tmp)


def test_trained_to_a_strict_local_minimum(trained):
    assert trained.gmax <= TRAIN_TOL, trained.gmax
    assert trained.lmin > 0, trained.lmin  # a minimum, so that "retrain from the optimum" has one answer nearby
    assert trained.acc >= 0.9, trained.acc


def test_loo_retrainings_converged_near_the_optimum(loo):
    _, _, gmax, lmins = loo
    assert gmax <= LOO_TOL, gmax
    assert min(lmins) > 0, min(lmins)  # every LOO objective's Hessian at the optimum is positive definite: the removals are local


def test_documented_configuration_predicts_loo_retraining(trained, scores, loo):
    "r ≥ 0.86 on both test points, and the predicted changes within 25% of the actual ones in norm (sign and scale)."
    pb, (tops, actual, _, _) = trained, loo
    res = scores[DOCUMENTED]
    assert res.converged and res.damping == WD, res
    for name, rr in scores.items(): REPORT[f'r {name}'] = [round(v, 3) for v in pb.r(rr.scores, tops, actual)]
    print('\n', REPORT)
    r = pb.r(res.scores, tops, actual)
    assert min(r) >= 0.86, r
    for c, (t, a) in enumerate(zip(tops, actual)):
        pred = -res.scores[t, c] / pb.n
        assert (pred - a).norm() <= 0.25 * a.norm(), (pred, a)


def test_at_least_as_accurate_as_kronfluence(trained, scores, loo, kron):
    "The documented configuration's r ≥ kronfluence's best r (its damping WD or its heuristic) on the same points; and our EK-FAC within 0.05 of its EK-FAC."
    pb, (tops, actual, _, _) = trained, loo
    ours = pb.r(scores[DOCUMENTED].scores, tops, actual)
    theirs = {k: pb.r(v, tops, actual) for k, v in kron.items()}
    print('\n r kronfluence', {k: [round(x, 3) for x in v] for k, v in theirs.items()})
    assert all(o >= max(t[c] for t in theirs.values()) for c, o in enumerate(ours)), (ours, theirs)
    ekfac = pb.r(scores['ekfac, damping=WD'].scores, tops, actual)
    assert all(o >= t - 0.05 for o, t in zip(ekfac, theirs['damping WD'])), (ekfac, theirs)
