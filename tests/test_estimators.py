import math, warnings
import pytest, torch
from torch import nn
import fastcore.test as fct
from conftest import DEVICES
from fastsprkd.core import DenseOperator, HessianOperator, LinearOperator
from fastsprkd.estimators import Estimate, SpectralDensity, SolveResult, trace, diagonal, spectral_density, logdet, solve

D = torch.float64


def spd_matrix(n=150, seed=0, top=(100., 50.), n_top=10, low=1.):
    "Symmetric matrix with `n_top` large eigenvalues and the rest uniform in [0, low]."
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D)).Q
    lam = torch.cat([torch.linspace(*top, n_top, dtype=D), low * torch.rand(n - n_top, generator=g, dtype=D)])
    return (U * lam) @ U.T, lam


class CountingOperator(LinearOperator):
    "Dense operator that records the number of columns of each `_matmat` call."
    def __init__(self, A):
        self.A, self.num_params, self.dtype, self.device, self.calls = A, A.shape[0], A.dtype, A.device, []
    def _matmat(self, V):
        self.calls.append(V.shape[1])
        return self.A @ V


def tiny_hessian(seed=0):
    "A float64 HessianOperator of a small MLP and its dense reference from torch.func.hessian."
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 4, dtype=D), torch.randint(0, 3, (40,))
    lf = nn.CrossEntropyLoss()
    op = HessianOperator(model, lf, (x, y))
    names = [n for n, _ in model.named_parameters()]
    def loss_of(flat): return lf(torch.func.functional_call(model, dict(zip(names, op.unflatten(flat))), (x,)), y)
    H = torch.func.hessian(loss_of)(op.flatten([p.detach() for p in model.parameters()]))
    return op, H


# ---------------------------------------------------------------- trace
@pytest.mark.parametrize('method', ['hutchinson', 'hutch++'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_trace_within_4_stderr(method, seed):
    A, lam = spd_matrix(seed=seed)
    est = trace(A, method=method, num_matvecs=60, seed=seed)
    assert isinstance(est, Estimate) and est.num_matvecs == 60
    assert est.stderr > 0
    assert abs(est.estimate - lam.sum().item()) <= 4 * est.stderr
    fct.test_close(est.samples.mean().item(), est.estimate, eps=1e-9)


def test_trace_of_hessian_operator_within_4_stderr():
    op, H = tiny_hessian()
    for method in ('hutchinson', 'hutch++'):
        est = trace(op, method=method, num_matvecs=30)
        assert abs(est.estimate - H.trace().item()) <= 4 * est.stderr


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise():
    g = torch.Generator().manual_seed(3)
    n, r = 300, 10
    L = torch.randn(n, r, generator=g, dtype=D)
    N = torch.randn(n, n, generator=g, dtype=D)
    A = 10 * L @ L.T + 0.05 * (N + N.T)  # low rank plus noise
    for seed in range(3):
        h = trace(A, method='hutchinson', num_matvecs=90, seed=seed)
        hpp = trace(A, method='hutch++', num_matvecs=90, seed=seed)
        assert hpp.num_matvecs == h.num_matvecs == 90
        assert hpp.stderr < h.stderr / 5
        assert abs(hpp.estimate - A.trace().item()) <= 4 * hpp.stderr


def test_trace_probes_go_through_one_matmat():
    A, _ = spd_matrix()
    op = CountingOperator(A)
    trace(op, method='hutchinson', num_matvecs=40)
    assert op.calls == [40]
    op.calls.clear()
    trace(op, method='hutch++', num_matvecs=60)
    assert op.calls == [20, 20, 20]


def test_trace_same_probes_whatever_the_batch():
    A, _ = spd_matrix()
    a = trace(A, method='hutchinson', num_matvecs=30, seed=5)
    b = trace(A, method='hutchinson', num_matvecs=30, seed=5, batch=7)
    fct.test_close(a.samples, b.samples, eps=1e-10)


def test_trace_rtol_stopping_rule():
    A, lam = spd_matrix(seed=4, top=(5., 1.), low=2.)
    est = trace(A, method='hutchinson', num_matvecs=2000, rtol=0.02)
    assert est.stderr <= 0.02 * abs(est.estimate)
    assert est.num_matvecs < 2000 and est.num_matvecs % 10 == 0
    est2 = trace(A, method='hutch++', num_matvecs=300, rtol=0.005, batch=5)
    assert est2.stderr <= 0.005 * abs(est2.estimate) and 200 < est2.num_matvecs < 300
    assert abs(est2.estimate - lam.sum().item()) <= 4 * est2.stderr


def test_hutchpp_exact_when_budget_covers_the_space():
    A, lam = spd_matrix(n=20)
    est = trace(A, method='hutch++', num_matvecs=60)
    assert est.stderr == 0
    fct.test_close(est.estimate, lam.sum().item(), eps=1e-9)


def test_trace_bad_input():
    A, _ = spd_matrix(n=10)
    fct.test_fail(lambda: trace(A, method='pyhessian'), contains="'hutch++', 'xtrace' or 'hutchinson'")
    fct.test_fail(lambda: trace(A, num_matvecs=5), contains='num_matvecs')
    fct.test_fail(lambda: trace(A, method='hutchinson', num_matvecs=1), contains='num_matvecs')
    fct.test_fail(lambda: trace(A, rtol=-1.), contains='rtol')
    fct.test_fail(lambda: trace(torch.randn(3, 4, dtype=D)), contains='square')
    fct.test_fail(lambda: trace([1, 2]), contains='linear operator')


# ---------------------------------------------------------------- diagonal
def test_diagonal_hutchinson():
    A, _ = spd_matrix(n=80, top=(5., 1.))
    est = diagonal(A, num_matvecs=500, seed=1)
    assert est.estimate.shape == (80,) and est.stderr.shape == (80,) and est.num_matvecs == 500
    z = (est.estimate - A.diagonal()) / est.stderr
    assert z.abs().max() < 5
    assert z.abs().mean() < 1.2  # ≈ 0.8 for a standard normal


# ---------------------------------------------------------------- spectral density
def test_slq_density_integrates_to_one_and_mean_is_trace_over_n():
    A, lam = spd_matrix(n=200)
    sd = spectral_density(A, num_probes=12, num_steps=40, seed=0)
    assert isinstance(sd, SpectralDensity) and sd.num_matvecs == 12 * 40
    fct.test_close(sd.weights.sum(1), torch.ones(12, dtype=D), eps=1e-12)
    grid = torch.linspace(-10, 110, 40001, dtype=D)
    for sigma in (0.1, 1.):
        fct.test_close(torch.trapezoid(sd.pdf(grid, sigma), grid).item(), 1., eps=1e-6)
    # the mean of the density is the Hutchinson estimate of tr/n from the same probes...
    h = trace(A, method='hutchinson', num_matvecs=12, seed=0)
    fct.test_close(sd.mean, h.estimate / 200, eps=1e-10)
    # ...and so within 4 standard errors of the exact tr/n
    t = sd.trace()
    fct.test_close(t.estimate / 200, sd.mean, eps=1e-10)
    assert abs(t.estimate - lam.sum().item()) <= 4 * t.stderr
    # the extreme Ritz values converge to the extreme eigenvalues
    fct.test_close(sd.nodes.max().item(), lam.max().item(), eps=1e-6)


def test_slq_batched_equals_eigen_lanczos_probe_by_probe():
    A, _ = spd_matrix(n=120)
    op = CountingOperator(A)
    a = spectral_density(op, num_probes=5, num_steps=25, seed=3)
    assert op.calls[0] == 5 and sum(op.calls) == 125  # a first matmat for all probes, then matmat or column by column, as timed
    b = spectral_density(A, num_probes=5, num_steps=25, seed=3, batch=1)
    fct.test_close(a.nodes, b.nodes, eps=1e-8)
    fct.test_close(a.weights, b.weights, eps=1e-8)


def test_slq_invariant_subspace_and_small_matrices():
    A = torch.diag(torch.tensor([1., 2., 3., 4.], dtype=D))
    sd = spectral_density(A, num_probes=3, num_steps=10)  # steps capped at n = 4
    assert sd.nodes.shape == (3, 4)
    fct.test_close(sd.trace().estimate, 10., eps=1e-9)  # 4 nodes integrate the identity exactly
    B = torch.eye(6, dtype=D) * 2  # Krylov space of dimension 1: early stop, padded with zero weights
    sd = spectral_density(B, num_probes=2, num_steps=5)
    assert torch.isfinite(sd.nodes).all()
    fct.test_close(sd.mean, 2., eps=1e-12)


def test_slq_of_hessian_operator_matches_dense_moments():
    from fastsprkd.estimators import _rademacher
    op, H = tiny_hessian()
    n = op.num_params
    sd = spectral_density(op, num_probes=4, num_steps=12, seed=7)
    V = _rademacher(n, 4, torch.Generator().manual_seed(7), H) / math.sqrt(n)
    # an m-node Gauss quadrature integrates polynomials of degree ≤ 2m−1 exactly: vᵀHᵏv = Σ wᵢθᵢᵏ
    for k in (1, 2, 3, 5):
        exact = (V * (torch.linalg.matrix_power(H, k) @ V)).sum(0)
        fct.test_close((sd.weights * sd.nodes ** k).sum(1), exact, eps=1e-10)
    # Ritz values lie inside the spectrum and the extreme ones have converged
    ev = torch.linalg.eigvalsh(H)
    assert sd.nodes.min() >= ev[0] - 1e-10 and sd.nodes.max() <= ev[-1] + 1e-10
    fct.test_close(sd.nodes.max().item(), ev[-1].item(), eps=1e-8)


def test_density_plot_returns_ax():
    import matplotlib; matplotlib.use('Agg')
    A, _ = spd_matrix(n=50)
    ax = spectral_density(A, num_probes=2, num_steps=10).plot()
    assert ax.get_yscale() == 'log' and ax.get_xlabel() == 'Eigenvalue'


# ---------------------------------------------------------------- logdet
def test_exact_logdet_equals_torch_logdet():
    A, _ = spd_matrix()
    B = A + 0.3 * torch.eye(150, dtype=D)
    est = logdet(B)
    assert est.stderr == 0
    fct.test_close(est.estimate, torch.logdet(B).item(), eps=1e-9)
    fct.test_close(logdet(A, shift=0.3).estimate, torch.logdet(B).item(), eps=1e-9)
    op, H = tiny_hessian()
    fct.test_close(logdet(op, shift=1.).estimate, torch.logdet(H + torch.eye(len(H), dtype=D)).item(), eps=1e-8)


def test_exact_logdet_refuses_non_pd_naming_the_eigenvalue():
    H = torch.diag(torch.tensor([-0.25, 1., 2.], dtype=D))
    fct.test_fail(lambda: logdet(H), contains='smallest eigenvalue is -0.25')
    fct.test_fail(lambda: logdet(H, shift=0.25), contains='shift above 0.25')
    fct.test_close(logdet(H, shift=0.5).estimate, math.log(0.25 * 1.5 * 2.5), eps=1e-12)


@pytest.mark.parametrize('seed', [0, 1])
def test_slq_logdet_within_4_stderr(seed):
    A, lam = spd_matrix(seed=seed)
    est = logdet(A, shift=0.5, method='slq', num_probes=30, num_steps=30, seed=seed)
    assert est.stderr > 0 and est.num_matvecs == 900
    assert abs(est.estimate - torch.log(lam + 0.5).sum().item()) <= 4 * est.stderr


def test_slq_logdet_warns_on_non_positive_ritz_values():
    H = torch.diag(torch.linspace(-1, 3, 50, dtype=D))
    with pytest.warns(UserWarning, match='smallest Ritz value'):
        est = logdet(H, method='slq', num_probes=3, num_steps=20)
    assert math.isnan(est.estimate)


def test_logdet_bad_method():
    fct.test_fail(lambda: logdet(torch.eye(3, dtype=D), method='cholesky'), contains="'exact' or 'slq'")


# ---------------------------------------------------------------- solve
def test_cg_residual_below_tol():
    A, _ = spd_matrix()
    g = torch.Generator().manual_seed(0)
    b = torch.randn(150, generator=g, dtype=D)
    for tol in (1e-6, 1e-10):
        r = solve(A, b, damping=0.5, tol=tol)
        assert isinstance(r, SolveResult) and r.converged and not r.negative_curvature
        true = ((b - A @ r.x - 0.5 * r.x).norm() / b.norm()).item()
        assert r.residual <= tol and abs(true - r.residual) <= 1e-3 * tol
    fct.test_close(r.x, torch.linalg.solve(A + 0.5 * torch.eye(150, dtype=D), b), eps=1e-8)


def test_cg_several_right_hand_sides_share_matmats():
    A, _ = spd_matrix()
    op = CountingOperator(A)
    B = torch.randn(150, 4, generator=torch.Generator().manual_seed(1), dtype=D)
    r = solve(op, B, damping=1., tol=1e-8)
    assert r.x.shape == (150, 4) and r.residual.shape == (4,) and (r.residual <= 1e-8).all()
    assert max(op.calls) <= 4 and len(op.calls) <= r.iterations + 1
    assert r.num_matvecs == sum(op.calls)
    fct.test_close(r.x, torch.linalg.solve(A + torch.eye(150, dtype=D), B), eps=1e-7)
    # warm start at the solution: no iteration needed
    r2 = solve(A, B, damping=1., tol=1e-6, x0=r.x)
    assert r2.iterations == 0 and r2.converged


def test_cg_on_hessian_operator():
    op, H = tiny_hessian()
    b = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0), dtype=D)
    damping = 0.1 - torch.linalg.eigvalsh(H)[0].item()  # the MLP's Hessian is indefinite
    r = solve(op, b, damping=damping, tol=1e-8)
    assert r.converged and r.residual <= 1e-8
    fct.test_close(r.x, torch.linalg.solve(H + damping * torch.eye(len(H), dtype=D), b), eps=1e-6)


def test_cg_reports_negative_curvature_and_non_convergence():
    H = torch.diag(torch.linspace(-1, 3, 40, dtype=D))
    b = torch.ones(40, dtype=D)
    with pytest.warns(UserWarning, match='not positive definite'):
        r = solve(H, b)
    assert r.negative_curvature and not r.converged
    A, _ = spd_matrix(top=(1e4, 1e3), low=1e-2)
    with pytest.warns(UserWarning, match='did not converge'):
        r = solve(A, torch.ones(150, dtype=D), tol=1e-12, max_iter=5)
    assert not r.converged and r.iterations == 5 and r.residual > 1e-12


def test_lissa_within_1e_3_relative():
    A, _ = spd_matrix(top=(2., 1.), low=1.)
    b = torch.randn(150, generator=torch.Generator().manual_seed(2), dtype=D)
    ref = torch.linalg.solve(A + 0.5 * torch.eye(150, dtype=D), b)
    r = solve(A, b, method='lissa', damping=0.5, scale=3., depth=500, tol=1e-6)
    assert r.converged and r.method == 'lissa' and r.scale == 3.
    assert ((r.x - ref).norm() / ref.norm()).item() < 1e-3
    r = solve(A, b, method='lissa', damping=0.5)  # scale from λ_max
    assert ((r.x - ref).norm() / ref.norm()).item() < 1e-3
    assert 2.5 < r.scale < 3.


def test_lissa_stochastic_over_minibatch_operators():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g, dtype=D)
    blocks = [X[i:i+50] for i in range(0, 200, 50)]
    ops = [DenseOperator(B.T @ B / 50) for B in blocks]
    H = X.T @ X / 200
    b = torch.randn(5, generator=g, dtype=D)
    ref = torch.linalg.solve(H + 0.5 * torch.eye(5, dtype=D), b)
    r = solve(ops, b, method='lissa', damping=0.5, scale=5., depth=400, repeats=8, seed=0)
    assert ((r.x - ref).norm() / ref.norm()).item() < 0.1
    fct.test_fail(lambda: solve(ops, b, method='lissa'), contains='pass `scale`')
    fct.test_fail(lambda: solve(ops, b), contains='one operator')


def test_lissa_samples_operators_by_their_samples():
    """Batches of 10 and 190 samples: LiSSA converges to the sample-weighted Hessian's solution (the data's), not the plain mean's.
    The data are well conditioned (λ(H) in [2, 17], λ_max of the small batch 30), so 25 runs of 100 steps suffice: over seeds
    0-19 the error is at most 0.11 and the distance to the plain mean's solution at least 0.41 (0.48 apart); sampling the two
    operators uniformly gives an error of at least 0.43 for every seed."""
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Linear(3, 1, bias=False).double()
    xa = torch.randn(10, 3, generator=g, dtype=D) * torch.tensor([3., 1., 1.], dtype=D)
    xb = torch.randn(190, 3, generator=g, dtype=D) * torch.tensor([1., 1., 3.], dtype=D)
    ya, yb = torch.randn(10, 1, generator=g, dtype=D), torch.randn(190, 1, generator=g, dtype=D)
    mse = torch.nn.MSELoss()
    ops = [HessianOperator(m, mse, (xa, ya)), HessianOperator(m, mse, (xb, yb))]
    fct.test_eq([o.num_samples for o in ops], [10, 190])
    H = HessianOperator(m, mse, [(xa, ya), (xb, yb)]).to_dense()
    Hu = (ops[0].to_dense() + ops[1].to_dense()) / 2
    b, I = torch.ones(3, dtype=D), torch.eye(3, dtype=D)
    ref, ref_u = torch.linalg.solve(H + 0.1 * I, b), torch.linalg.solve(Hu + 0.1 * I, b)
    assert ((ref - ref_u).norm() / ref.norm()).item() > 0.4  # the two candidate answers are far apart
    with pytest.warns(UserWarning, match='stochastic LiSSA over 2 operators'):
        r = solve(ops, b, method='lissa', damping=0.1, scale=30., depth=100, repeats=25, seed=0)
    err, err_u = ((r.x - ref).norm() / ref.norm()).item(), ((r.x - ref_u).norm() / ref_u.norm()).item()
    assert err < 0.2 and err_u > 0.3, (err, err_u)


def test_lissa_divergence_raises_with_scale_hint():
    A, lam = spd_matrix(top=(10., 5.), low=1.)
    b = torch.ones(150, dtype=D)
    fct.test_fail(lambda: solve(A, b, method='lissa', scale=4.), contains='increase `scale`')
    H = torch.diag(torch.linspace(-1, 3, 40, dtype=D))  # indefinite: diverges whatever the scale
    fct.test_fail(lambda: solve(H, torch.ones(40, dtype=D), method='lissa', scale=5.), contains='LiSSA diverges')


def test_solve_bad_input():
    A, _ = spd_matrix(n=10)
    fct.test_fail(lambda: solve(A, torch.ones(9, dtype=D)), contains='shape (10,)')
    fct.test_fail(lambda: solve(A, torch.ones(10)), contains='dtype')
    fct.test_fail(lambda: solve(A, torch.ones(10, dtype=D), x0=torch.ones(4, dtype=D)), contains='shape')
    fct.test_fail(lambda: solve(A, torch.ones(10, dtype=D), method='newton'), contains="'cg' or 'lissa'")
    fct.test_fail(lambda: solve(A, torch.full((10,), float('nan'), dtype=D)), contains='non-finite')
    fct.test_fail(lambda: solve([], torch.ones(10, dtype=D), method='lissa'), contains='empty')
    fct.test_fail(lambda: solve(A, torch.ones(10, dtype=D), method='lissa', scale=-1.), contains='scale must be positive')
    r = solve(A, torch.zeros(10, dtype=D))
    assert r.converged and r.x.abs().max() == 0


@pytest.mark.parametrize('device', DEVICES)
def test_estimators_on_device(device):
    A, lam = spd_matrix(n=100)
    A = A.to(device)
    est = trace(A, num_matvecs=30)
    assert abs(est.estimate - lam.sum().item()) <= 4 * est.stderr + 1e-9
    # probes are drawn on the CPU: the same numbers on every device
    fct.test_close(est.estimate, trace(A.cpu(), num_matvecs=30).estimate, eps=1e-8)
    r = solve(A, torch.ones(100, dtype=D, device=device), damping=1., tol=1e-8)
    assert r.x.device == A.device and r.residual <= 1e-8
    sd = spectral_density(A, num_probes=2, num_steps=10)
    assert sd.nodes.device.type == 'cpu'
    fct.test_close(logdet(A, shift=1.).estimate, torch.log(lam + 1).sum().item(), eps=1e-8)



def test_cg_says_when_tol_is_below_the_dtypes_reach():
    "float32 CG stalls near 3e-8: the warning says so (raising max_iter would not help) instead of asking for more iterations."
    g = torch.Generator().manual_seed(0)
    A = torch.randn(60, 60, generator=g); A = (A @ A.T / 60 + torch.eye(60)).float()
    b = torch.randn(60, generator=g)
    with pytest.warns(UserWarning, match='stalled .* below what torch.float32 arithmetic reaches'):
        r = solve(A, b, tol=1e-12, max_iter=10_000)
    assert r.iterations < 10_000 and not r.converged
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert solve(A, b, tol=1e-5).converged


# ---------------------------------------------------------------- XTrace / XDiag (issue 21)
def low_rank_plus_noise(n=200, r=15, seed=0, noise=0.3):
    "Symmetric matrix with r eigenvalues from 100 down to 10 and the rest uniform in [0, noise]."
    return spd_matrix(n=n, seed=seed, top=(100., 10.), n_top=r, low=noise)


def _errors(A, exact, seeds=range(30), **kw):
    es = [trace(A, seed=s, **kw) for s in seeds]
    err = torch.tensor([e.estimate - exact for e in es], dtype=D)
    return err, torch.tensor([e.stderr for e in es], dtype=D), es


def test_xtrace_unbiased_accurate_and_honest_stderr():
    A, lam = low_rank_plus_noise(r=25)  # rank above Hutch++'s 20-vector sketch, below XTrace's 30 probes
    exact = lam.sum().item()
    err, se, es = _errors(A, exact, method='xtrace', num_matvecs=60)
    assert all(e.num_matvecs == 60 and e.method == 'xtrace' and len(e.samples) == 30 for e in es)
    rms = err.pow(2).mean().sqrt().item()
    assert abs(err.mean().item()) <= 4 * err.std().item() / math.sqrt(len(err)), "biased over seeds"
    ratio = se.median().item() / rms
    assert 1 / 3 <= ratio <= 3, f"reported stderr / empirical error = {ratio:.2g}"
    herr, _, _ = _errors(A, exact, method='hutchinson', num_matvecs=60)
    perr, _, _ = _errors(A, exact, method='hutch++', num_matvecs=60)
    assert rms <= herr.pow(2).mean().sqrt().item() / 20, "not far below Hutchinson at equal products"
    assert rms <= perr.pow(2).mean().sqrt().item() / 10, "not far below Hutch++ at equal products"


def test_xtrace_vs_curvlinops_oracle():
    curvlinops = pytest.importorskip('curvlinops', reason='curvlinops (test dependency) not installed')
    A, lam = low_rank_plus_noise(seed=1)
    exact = lam.sum().item()
    ours, _, _ = _errors(A, exact, method='xtrace', num_matvecs=40)
    theirs = []
    for s in range(30):
        torch.manual_seed(s); theirs.append(float(curvlinops.xtrace(A, 40)) - exact)
    a, b = ours.pow(2).mean().sqrt().item(), torch.tensor(theirs).pow(2).mean().sqrt().item()
    assert 0.5 <= a / b <= 2, f"rms error {a:.3g} vs curvlinops' {b:.3g}"


def test_xtrace_rtol_stop_exact_cases_and_hessian():
    A, lam = low_rank_plus_noise()
    e = trace(A, method='xtrace', num_matvecs=400, rtol=1e-3)
    assert e.num_matvecs < 400 and e.num_matvecs % 2 == 0 and e.stderr <= 1e-3 * abs(e.estimate)
    assert abs(e.estimate - lam.sum().item()) <= 5 * e.stderr
    B = low_rank_plus_noise(n=60, r=3, noise=0.)[0]  # rank 3 < 10 probes: the sketch holds range(B), the trace is exact
    e = trace(B, method='xtrace', num_matvecs=20)
    fct.test_close(e.estimate, B.trace().item(), eps=1e-8); assert e.stderr == 0
    C = spd_matrix(n=8, n_top=3)[0]  # as many probes as rows: exact
    e = trace(C, method='xtrace', num_matvecs=20)
    fct.test_close(e.estimate, C.trace().item(), eps=1e-9); assert e.stderr == 0 and e.num_matvecs == 16
    op, H = tiny_hessian()
    e = trace(op, method='xtrace', num_matvecs=30)
    assert abs(e.estimate - H.trace().item()) <= 4 * e.stderr + 1e-9


def test_xdiag_unbiased_accurate_and_honest_stderr():
    A, _ = low_rank_plus_noise(n=120, r=10)
    d = A.diagonal()
    ds = [diagonal(A, method='xdiag', num_matvecs=40, seed=s) for s in range(30)]
    assert all(x.num_matvecs == 40 and x.method == 'xdiag' and x.estimate.shape == (120,) for x in ds)
    err = torch.stack([x.estimate for x in ds]) - d
    z = err.mean(0).abs() / (err.std(0) / math.sqrt(30))
    assert z.max() <= 5, f"biased entries (max |z| = {z.max():.2g} over 120 entries)"
    rms = err.pow(2).mean().sqrt().item()
    se = torch.stack([x.stderr for x in ds]).pow(2).mean().sqrt().item()
    assert 1 / 3 <= se / rms <= 3, f"reported stderr / empirical error = {se / rms:.2g}"
    h = torch.stack([diagonal(A, num_matvecs=40, seed=s).estimate for s in range(30)]) - d
    assert rms <= h.pow(2).mean().sqrt().item() / 5, "not far below Hutchinson's diagonal at equal products"
    curvlinops = pytest.importorskip('curvlinops', reason='curvlinops (test dependency) not installed')
    theirs = []
    for s in range(30):
        torch.manual_seed(s); theirs.append(curvlinops.xdiag(A, 40) - d)
    b = torch.stack(theirs).pow(2).mean().sqrt().item()
    assert 0.5 <= rms / b <= 2, f"rms error {rms:.3g} vs curvlinops' xdiag {b:.3g}"


def test_xtrace_xdiag_bad_input():
    A, _ = spd_matrix(n=10)
    fct.test_fail(lambda: trace(A, method='xtrace', num_matvecs=3), contains='num_matvecs')
    fct.test_fail(lambda: diagonal(A, method='xdiag', num_matvecs=3), contains='num_matvecs')
    fct.test_fail(lambda: diagonal(A, method='hutch++'), contains="'hutchinson' or 'xdiag'")
    fct.test_fail(lambda: trace(A, method='xtrace', batch=0), contains='batch')


# ---------------------------------------------------------------- tolerances (issue 19)
@pytest.mark.parametrize('tol', [-1, 0, 0., 1., 3., float('nan'), float('inf'), '1e-3', True])
def test_tolerances_refused_with_their_range(tol):
    A, _ = spd_matrix(n=10)
    op = DenseOperator(A)
    b = torch.ones(10, dtype=D)
    fct.test_fail(lambda: solve(op, b, tol=tol), contains='0 < tol < 1')
    fct.test_fail(lambda: solve(op, b, method='lissa', scale=200., tol=tol), contains='0 < tol < 1')
    for method in ('hutchinson', 'hutch++', 'xtrace'):
        fct.test_fail(lambda: trace(op, method=method, rtol=tol), contains='0 < rtol < 1')
    assert op.num_matvecs == 0


# ---------------------------------------------------------------- autocast and half precision (issue 15 item 4)
def _float32_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    return HessianOperator(model, nn.CrossEntropyLoss(), (x, y))


def test_estimators_inside_bf16_autocast_equal_outside():
    op = _float32_hessian()
    b = torch.ones(op.num_params)
    def run():
        return [trace(op, method='hutch++', num_matvecs=30).estimate, trace(op, method='xtrace', num_matvecs=30).estimate,
                trace(op, method='hutchinson', num_matvecs=10).estimate,
                diagonal(op, num_matvecs=10).estimate, diagonal(op, method='xdiag', num_matvecs=20).estimate,
                spectral_density(op, num_probes=3, num_steps=10).nodes,
                logdet(op, method='slq', shift=10., num_probes=3, num_steps=10).estimate,
                solve(op, b, damping=1., tol=1e-5).x]
    run()  # mode='auto' times fwd against rev on the first product of each kind: decided here, before the compared runs
    out = run()
    with torch.autocast('cpu', torch.bfloat16):
        inside = run()
    for a, c in zip(out, inside):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(c)), (a, c)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_estimators_on_half_precision_operator(dtype):
    A, lam = low_rank_plus_noise(n=80, r=8)
    Ah = A.to(dtype)
    exact = Ah.double().trace().item()
    for method in ('hutch++', 'xtrace', 'hutchinson'):
        e = trace(Ah, method=method, num_matvecs=40)
        assert math.isfinite(e.estimate) and abs(e.estimate - exact) <= 4 * e.stderr + 2e-2 * abs(exact), (method, e)
    d = diagonal(Ah, method='xdiag', num_matvecs=40)
    assert d.estimate.dtype == dtype and torch.isfinite(d.estimate.float()).all()
    sd = spectral_density(Ah, num_probes=2, num_steps=15)
    assert abs(sd.nodes.max().item() - 100.) <= 2.


# ---------------------------------------------------------------- batched SLQ: matmat or column loop, by timing (issue 21)
class SlowOperator(CountingOperator):
    "A dense operator whose many-column products (or single ones) are made slow."
    def __init__(self, A, slow_many):
        super().__init__(A); self.slow_many = slow_many
    def _matmat(self, V):
        import time
        if (V.shape[1] > 1) == self.slow_many: time.sleep(0.002 * V.shape[1])
        return super()._matmat(V)


@pytest.mark.parametrize('slow_many', [True, False])
def test_batched_slq_chooses_the_faster_product(slow_many):
    A, _ = spd_matrix(n=60)
    op = SlowOperator(A, slow_many)
    sd = spectral_density(op, num_probes=4, num_steps=12, seed=1)
    assert sum(op.calls) == 48 and op.calls[:15] == [4, 1, 1, 1, 1] * 3  # steps 0-5 alternate matmat / column loop
    rest = op.calls[15:]
    assert rest == ([1] * 24 if slow_many else [4] * 6), rest
    ref = spectral_density(A, num_probes=4, num_steps=12, seed=1, batch=1)
    fct.test_close(sd.nodes, ref.nodes, eps=1e-8)


def test_slq_float64_arithmetic_on_float32_operator():
    A, lam = spd_matrix(n=150)
    a = spectral_density(A.float(), num_probes=3, num_steps=40)
    b = spectral_density(A.float(), num_probes=3, num_steps=40, lanczos_dtype=torch.float32)
    ref = spectral_density(A, num_probes=3, num_steps=40)
    assert a.nodes.dtype == D
    ea, eb = (a.nodes - ref.nodes).abs().max().item(), (b.nodes - ref.nodes).abs().max().item()
    assert ea <= 1e-4 * lam.max().item() and ea <= eb, (ea, eb)
    fct.test_fail(lambda: spectral_density(A, lanczos_dtype=torch.bfloat16), contains='lanczos_dtype')


def _spectrum_matrix(kind, n=300):
    "n×n symmetric matrix with a fixed random eigenbasis and the named spectrum (the spectra of bench/bench_stderr.py)."
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D)).Q
    k = torch.arange(1, n + 1, dtype=D)
    flat = 0.5 + torch.rand(n, generator=g, dtype=D)
    lam = {'flat': flat, 'poly1': 1 / k, 'exp': 0.9 ** k}[kind]
    A = (U * lam) @ U.T
    return (A + A.T) / 2


def _calibration(err, se):
    "RMS(error) / RMS(reported stderr) and the coverage of |error| ≤ 2·stderr."
    return (err.pow(2).mean().sqrt() / se.pow(2).mean().sqrt()).item(), (err.abs() <= 2 * se).double().mean().item()


@pytest.mark.parametrize('kind,m', [('exp', 40), ('poly1', 80), ('flat', 80)])
def test_xtrace_stderr_calibrated(kind, m):
    "200 seeds: the naive std/√s of the leave-one-out samples gave ratio 1.68/1.49/1.46 and coverage 0.75/0.82/0.82 here."
    A = _spectrum_matrix(kind); op, exact = DenseOperator(A), A.trace().item()
    es = [trace(op, method='xtrace', num_matvecs=m, seed=s) for s in range(200)]
    ratio, cover = _calibration(torch.tensor([e.estimate - exact for e in es], dtype=D), torch.tensor([e.stderr for e in es], dtype=D))
    assert 0.8 <= ratio <= 1.25, f"RMS error / RMS stderr = {ratio:.2f} (1 is honest; > 1: error bars too small)"
    assert cover >= 0.88, f"only {cover:.0%} of the errors within ±2 stderr"


def test_xdiag_stderr_calibrated_per_entry():
    "200 seeds, flat spectrum, 80 products: the naive per-entry std/√s gave pooled ratio 1.34, coverage 0.86, worst entry 1.53."
    A = _spectrum_matrix('flat'); op = DenseOperator(A)
    ds = [diagonal(op, method='xdiag', num_matvecs=80, seed=s) for s in range(200)]
    err, se = torch.stack([x.estimate for x in ds]) - A.diagonal(), torch.stack([x.stderr for x in ds])
    ratio, cover = _calibration(err, se)
    assert 0.8 <= ratio <= 1.2 and cover >= 0.92, f"pooled ratio {ratio:.2f}, coverage {cover:.2f}"
    per = err.pow(2).mean(0).sqrt() / se.pow(2).mean(0).sqrt()
    assert per.max() <= 1.3 and per.min() >= 0.7, f"per-entry ratio in [{per.min():.2f}, {per.max():.2f}]"


def test_xtrace_rtol_stop_reaches_its_tolerance():
    "The stop rule stops on the stderr: with the naive stderr it stopped at 47 products, RMS error 1.45·rtol, coverage 0.75."
    A = _spectrum_matrix('poly1'); exact = A.trace().item()
    es = [trace(A, method='xtrace', num_matvecs=400, rtol=0.01, batch=10, seed=s) for s in range(200)]
    err = torch.tensor([e.estimate - exact for e in es], dtype=D)
    rel = (err / exact).pow(2).mean().sqrt().item() / 0.01
    _, cover = _calibration(err, torch.tensor([e.stderr for e in es], dtype=D))
    assert all(e.stderr <= 0.01 * abs(e.estimate) or e.num_matvecs == 400 for e in es)
    assert rel <= 1.25 and cover >= 0.85, f"RMS relative error {rel:.2f}·rtol, coverage {cover:.2f}"
