"""Issue 17's accuracy acceptance: influence against leave-one-out (LOO) retraining on a non-convex digits CNN.

Run: `OMP_NUM_THREADS=1 .venv/bin/python -m pytest -s -p no:cacheprovider bench/influence_loo.py` (about 12 min; not part of
`make test`). The convex case with more training points, which runs in `make test`, is tests/test_influence_convex.py.

Procedure (Koh & Liang 2017, §5.1, with full retraining instead of a fixed number of steps):
- model: `SmoothDigitsCNN`, DigitsCNN(width=8)'s layers (Conv(1→8)–act–pool–Conv(8→16)–act–pool–Linear(64→10), 1,898
  parameters) with SiLU and average pooling instead of ReLU and max pooling, so that the training objective is smooth and
  "trained to a small gradient" is well posed (with ReLU/max-pool kinks full-batch L-BFGS stalled at a max |gradient| of
  about 1e-4; measured while writing this test); float64;
- data: `N_TRAIN` bundled digits (a fixed permutation), the rest as test images;
- objective: mean cross-entropy + (WD/2)·‖θ‖² (WD = weight decay, so that the optimum is well defined), trained
  full-batch (Adam, then L-BFGS) to max |∇| ≤ TRAIN_TOL;
- two test points: those at the 97th and 90th percentile of the test loss (a badly and a moderately predicted image);
- for each: `influence` of the asserted configuration, the 30 training points of largest |influence|, each removed and the
  model retrained from the optimum (warm-started full-batch L-BFGS, objective (1/N)·Σ_{k≠i} ℓ_k + (WD/2)·‖θ‖²) to max
  |∇| ≤ LOO_TOL; predicted change of the test loss −influence/N (removing a point = upweighting it by −1/N; Koh & Liang's
  I_up,loss sign, see `plot_influence`), actual change = retrained test loss − optimum's; Pearson r over the 30 points.

Configurations (damping = weight decay + 0.01 as in the issue, since `loss_func` carries no regularization):
- 'last layer' (asserted default: r ≥ 0.86 on both points): `influence(..., params=model.fc, damping=WD + 0.01)`, the
  Hessian of the last layer's block only; its top-30 points are the ones retrained;
- 'all parameters' (reported): `influence(..., damping=WD + 0.01)` (CG on the full Hessian), on the same points;
- 'EK-FAC' (reported): `influence(..., curvature='ekfac', damping=WD + 0.01)`, on the same points;
- kronfluence 1.0.1 (EK-FAC factors of the same model and data, pairwise scores, float64; its score is −I_up,loss and its
  curvature is the mean loss's, so the predicted change is score/N): the best r of its damping_factor = WD + 0.01 and
  its mean-eigenvalue heuristic (None), on the same points; the asserted configuration must reach at least that r.
- the convex case: the features frozen at the optimum, the last layer's regularized logistic regression retrained
  exactly (Newton) without each of its own top-30 points: r ≥ 0.95.

`pytest -s` prints every r and the phases' seconds. Measured (2026-12-02, 2-core CPU at load average 7-8 from the
other engineers' jobs, 1 torch thread): the file took 710 s (training 120 s to max |∇| 3.9e-7 after 3,001 L-BFGS
evaluations; LOO retraining 555 s for 60 retrainings of at most 500 evaluations each; kronfluence 3.7 s), far above the
issue's budget, and 4 of its 6 tests FAIL on real numbers, test points (97th, 90th percentile of the test loss):
  last layer (asserted)  r = 0.881 / 0.841  (≥ 0.86 fails on the second point)
  all parameters         r = 0.908 / 0.852
  EK-FAC (fastsprkd)     r = 0.829 / 0.286
  kronfluence EK-FAC     r = 0.836 / 0.373 (damping WD + 0.01), 0.815 / 0.229 (its heuristic): ours ≥ kronfluence passes
  convex last layer      r = 0.946 / 0.910  (≥ 0.95 fails)
  LOO convergence: the worst retraining ended at max |∇| 2.4e-4 after 500 evaluations (≤ 1e-5 fails).
"""
import time, tempfile, warnings
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call
from fastsprkd.data import digits_tensors
from fastsprkd.analysis import influence
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import kronfluence_ce_task
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
from test_influence_convex import SmoothDigitsCNN  # the smooth 1,898-parameter digits CNN, defined once

D = torch.float64
N_TRAIN, WD, EXTRA = 400, 5e-3, 0.01
TRAIN_TOL, LOO_TOL, TOP = 1e-8, 1e-6, 30
REPORT = {}



def pearson(a, b): return torch.corrcoef(torch.stack([torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D)]))[0, 1].item()


class Problem:
    "The regularized full-batch training problem in flat parameters (weights `w` per training point: 0 removes it)."
    def __init__(self):
        x, y = digits_tensors()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x = x.double()
        self.Xtr, self.Ytr, self.Xte, self.Yte = x[perm[:N_TRAIN]], y[perm[:N_TRAIN]], x[perm[N_TRAIN:]], y[perm[N_TRAIN:]]
        torch.manual_seed(0)
        self.model = SmoothDigitsCNN().double()
        ps = dict(self.model.named_parameters())
        self.names, self.shapes = list(ps), [p.shape for p in ps.values()]
        self.sizes = [p.numel() for p in ps.values()]
    def unflat(self, th): return dict(zip(self.names, [t.view(s) for t, s in zip(th.split(self.sizes), self.shapes)]))
    def objective(self, th, w=None):
        l = F.cross_entropy(functional_call(self.model, self.unflat(th), (self.Xtr,)), self.Ytr, reduction='none')
        return (l.mean() if w is None else (w * l).sum() / N_TRAIN) + WD / 2 * th.pow(2).sum()
    def grad_max(self, th, w=None):
        th = th.detach().requires_grad_(True)
        return torch.autograd.grad(self.objective(th, w), th)[0].abs().max().item()
    def test_loss(self, th, j):
        return F.cross_entropy(functional_call(self.model, self.unflat(th), (self.Xte[j:j+1],)), self.Yte[j:j+1]).item()
    def lbfgs(self, th, w=None, tol=1e-8, max_evals=3000):
        th = th.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([th], lr=1, max_iter=max_evals, max_eval=max_evals, tolerance_grad=tol, tolerance_change=0,
                                history_size=100, line_search_fn='strong_wolfe')
        def closure():
            opt.zero_grad(); l = self.objective(th, w); l.backward(); return l
        opt.step(closure)
        return th.detach(), self.grad_max(th, w), opt.state[opt._params[0]]['func_evals']
    def load(self, th):
        with torch.no_grad():
            for p, v in zip(self.model.parameters(), self.unflat(th).values()): p.copy_(v)


@pytest.fixture(scope='module')
def trained():
    t0 = time.perf_counter()
    pb = Problem()
    th = torch.cat([p.detach().flatten() for p in pb.model.parameters()]).requires_grad_(True)
    opt = torch.optim.Adam([th], lr=0.02)
    for _ in range(300):
        opt.zero_grad(); pb.objective(th).backward(); opt.step()
    pb.theta, pb.gmax, evals = pb.lbfgs(th, tol=TRAIN_TOL)
    pb.load(pb.theta)
    with torch.no_grad(): losses = F.cross_entropy(pb.model(pb.Xte), pb.Yte, reduction='none')
    pb.acc = (pb.model(pb.Xte).argmax(1) == pb.Yte).double().mean().item()
    order = losses.argsort()
    pb.js = [order[int(len(order) * 0.97)].item(), order[int(len(order) * 0.90)].item()]
    REPORT['train'] = dict(seconds=round(time.perf_counter() - t0, 1), gmax=f'{pb.gmax:.1e}', lbfgs_evals=evals, test_acc=round(pb.acc, 3),
                           test_losses=[round(losses[j].item(), 3) for j in pb.js])
    return pb


CONFIGS = {'last layer': lambda pb: dict(params=pb.model.fc, damping=WD + EXTRA),
           'all parameters': lambda pb: dict(damping=WD + EXTRA),
           'EK-FAC': lambda pb: dict(curvature='ekfac', damping=WD + EXTRA)}


@pytest.fixture(scope='module')
def scores(trained):
    pb, out = trained, {}
    test = (pb.Xte[pb.js], pb.Yte[pb.js])
    for name, kw in CONFIGS.items():
        t0 = time.perf_counter()
        res = influence(pb.model, nn.CrossEntropyLoss(), (pb.Xtr, pb.Ytr), test, **kw(pb))
        out[name] = res.scores
        REPORT[f'influence {name}'] = dict(seconds=round(time.perf_counter() - t0, 1), residual=f'{res.residual:.1e}', converged=res.converged)
    return out


@pytest.fixture(scope='module')
def loo(trained, scores):
    "For each test point: the top-30 training points of the asserted configuration and the actual LOO change of its loss."
    pb, t0 = trained, time.perf_counter()
    tops, actual, worst = [], [], []
    for c, j in enumerate(pb.js):
        top = scores['last layer'][:, c].abs().argsort(descending=True)[:TOP]
        base = pb.test_loss(pb.theta, j)
        a = []
        for i in top.tolist():
            w = torch.ones(N_TRAIN, dtype=D); w[i] = 0
            th_i, gm, _ = pb.lbfgs(pb.theta, w, tol=LOO_TOL, max_evals=500)
            worst.append(gm)
            a.append(pb.test_loss(th_i, j) - base)
        tops.append(top); actual.append(torch.tensor(a, dtype=D))
    REPORT['LOO retraining'] = dict(seconds=round(time.perf_counter() - t0, 1), worst_gmax=f'{max(worst):.1e}')
    return tops, actual, max(worst)


def kronfluence_scores(pb, damping, tmp):
    "kronfluence's pairwise EK-FAC scores (n_train × 2), float64, as I_up,loss (its score is −I_up,loss)."
    import copy
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    task = kronfluence_ce_task()
    model = prepare_model(copy.deepcopy(pb.model), task)
    tr = torch.utils.data.TensorDataset(pb.Xtr, pb.Ytr)
    te = torch.utils.data.TensorDataset(pb.Xte[pb.js], pb.Yte[pb.js])
    an = Analyzer('loo', model, task, cpu=True, disable_tqdm=True, output_dir=tmp, log_level=40)
    dk = DataLoaderKwargs(num_workers=0)
    f64 = dict(activation_covariance_dtype=D, gradient_covariance_dtype=D, per_sample_gradient_dtype=D, lambda_dtype=D)
    an.fit_all_factors(factors_name='f', dataset=tr, per_device_batch_size=N_TRAIN, factor_args=FactorArguments(strategy='ekfac', **f64),
                       overwrite_output_dir=True, dataloader_kwargs=dk)
    out = {}
    for label, dmp in damping.items():
        an.compute_pairwise_scores(scores_name=label, factors_name='f', query_dataset=te, train_dataset=tr, per_device_query_batch_size=2,
                                   per_device_train_batch_size=N_TRAIN, overwrite_output_dir=True, dataloader_kwargs=dk,
                                   score_args=ScoreArguments(damping_factor=dmp, per_sample_gradient_dtype=D, precondition_dtype=D, score_dtype=D))
        out[label] = -an.load_pairwise_scores(label)['all_modules'].double().T
    return out


@pytest.fixture(scope='module')
def kron(trained):
    pytest.importorskip('kronfluence', reason='kronfluence is not installed: the comparison with it is skipped')
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = kronfluence_scores(trained, {'damping WD+0.01': WD + EXTRA, 'damping heuristic': None}, tmp)
    REPORT['kronfluence'] = dict(seconds=round(time.perf_counter() - t0, 1))
    return out


def rs(I, tops, actual):
    "Pearson r of the predicted change −I/N against the actual one, per test point, on the retrained points."
    return [pearson(-I[top, c] / N_TRAIN, a) for c, (top, a) in enumerate(zip(tops, actual))]


def test_trained_to_a_small_gradient(trained):
    print('\n', REPORT['train'])
    assert trained.gmax <= 1e-6, trained.gmax
    assert trained.acc >= 0.9, trained.acc


def test_loo_retrainings_converged(loo):
    assert loo[2] <= 10 * LOO_TOL, loo[2]


def test_last_layer_influence_predicts_loo_retraining(trained, scores, loo):
    tops, actual, _ = loo
    r = rs(scores['last layer'], tops, actual)
    REPORT['r last layer'] = [round(v, 3) for v in r]
    REPORT['r all parameters'] = [round(v, 3) for v in rs(scores['all parameters'], tops, actual)]
    print('\n', {k: v for k, v in REPORT.items() if not k.startswith('r EK')})
    assert min(r) >= 0.86, r


def test_at_least_as_accurate_as_kronfluence(trained, scores, loo, kron):
    tops, actual, _ = loo
    ours = rs(scores['last layer'], tops, actual)
    theirs = {k: rs(v, tops, actual) for k, v in kron.items()}
    best = [max(t[c] for t in theirs.values()) for c in range(len(ours))]
    REPORT['r kronfluence'] = {k: [round(x, 3) for x in v] for k, v in theirs.items()}
    print('\n', REPORT['r kronfluence'], REPORT.get('kronfluence'))
    assert all(o >= b for o, b in zip(ours, best)), (ours, theirs)


def test_ekfac_configuration(trained, scores, loo, kron):
    "fastsprkd's EK-FAC (reported; asserted only to be as good as kronfluence's EK-FAC at the same damping, up to 0.05)."
    tops, actual, _ = loo
    r = rs(scores['EK-FAC'], tops, actual)
    theirs = rs(kron['damping WD+0.01'], tops, actual)
    REPORT['r EK-FAC'] = [round(v, 3) for v in r]
    print('\n r EK-FAC', REPORT['r EK-FAC'], 'kronfluence same damping', [round(v, 3) for v in theirs])
    assert all(o >= t - 0.05 for o, t in zip(r, theirs)), (r, theirs)


def newton_fc(phi, Y, W, w=None, iters=30):
    "Exact minimizer of (1/N)·Σ wᵢ·CE(W·[φᵢ, 1]) + (WD/2)·‖W‖² (W: 10 × 65, the last layer with its bias) by Newton's method."
    Pa = torch.cat([phi, torch.ones(len(phi), 1, dtype=D)], 1)
    w = torch.ones(len(phi), dtype=D) if w is None else w
    K, d = W.shape
    for _ in range(iters):
        p = F.softmax(Pa @ W.T, -1)
        R = p - F.one_hot(Y, K).to(D)
        g = ((w[:, None] * R).T @ Pa / N_TRAIN + WD * W).flatten()
        L = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # N × K × K
        H = torch.einsum('n,nab,ni,nj->aibj', w, L, Pa, Pa).reshape(K * d, K * d) / N_TRAIN + WD * torch.eye(K * d, dtype=D)
        step = torch.linalg.solve(H, g).view(K, d)
        W = W - step
        if step.abs().max() < 1e-14: break
    return W


def test_convex_last_layer_case(trained):
    "Features frozen at the optimum: the last layer's regularized logistic regression, retrained exactly without each point."
    pb = trained
    with torch.no_grad(): phi_tr, phi_te = pb.model.features(pb.Xtr), pb.model.features(pb.Xte)
    W0 = newton_fc(phi_tr, pb.Ytr, torch.cat([pb.model.fc.weight, pb.model.fc.bias[:, None]], 1).detach())
    feats = nn.Linear(64, 10).double()
    with torch.no_grad(): feats.weight.copy_(W0[:, :64]); feats.bias.copy_(W0[:, 64])
    def tl(W, j): return F.cross_entropy((torch.cat([phi_te[j], torch.ones(1, dtype=D)]) @ W.T)[None], pb.Yte[j:j+1]).item()
    I = influence(feats, nn.CrossEntropyLoss(), (phi_tr, pb.Ytr), (phi_te[pb.js], pb.Yte[pb.js]), damping=WD).scores  # the L2 term's Hessian
    r = []
    for c, j in enumerate(pb.js):
        top = I[:, c].abs().argsort(descending=True)[:TOP]
        actual = []
        for i in top.tolist():
            w = torch.ones(N_TRAIN, dtype=D); w[i] = 0
            actual.append(tl(newton_fc(phi_tr, pb.Ytr, W0, w), j) - tl(W0, j))
        r.append(pearson(-I[top, c] / N_TRAIN, actual))
    REPORT['r convex last layer'] = [round(v, 3) for v in r]
    print('\n r convex', REPORT['r convex last layer'])
    assert min(r) >= 0.95, r
