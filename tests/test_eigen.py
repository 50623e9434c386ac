"Acceptance tests of `eigsh` and `power_iteration` (issue 3) against `torch.linalg.eigvalsh` of dense float64 references."
import copy, warnings
import pytest, torch
from torch import nn
import fastcore.test as fct
from hypothesis import given, settings, strategies as st
from fastsprkd.core import HessianOperator, DenseOperator
from fastsprkd.eigen import eigsh, power_iteration, lanczos, EigResult
from test_core import cnn, mlp, make_data, reference, CE, F64

WHICH = ['LA', 'SA', 'LM', 'BE']


def sym(evals, seed=0):
    "Dense symmetric matrix with the given eigenvalues and a random orthogonal eigenbasis."
    g = torch.Generator().manual_seed(seed)
    n = len(evals)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (Q * torch.as_tensor(evals, dtype=F64)) @ Q.T

def wanted(ev, k, which):
    "The k eigenvalues `eigsh` must return (ascending), from all eigenvalues `ev` (ascending)."
    n = ev.shape[0]
    if which == 'LA': return ev[n - k:]
    if which == 'SA': return ev[:k]
    if which == 'LM': return ev[ev.abs().argsort(descending=True, stable=True)[:k]].sort().values
    lo = k // 2                        # both ends: k//2 from the bottom, the rest (one more when k is odd) from the top
    return torch.cat([ev[:lo], ev[n - (k - lo):]])

def check_eigsh(A, r, ev, k, which, tol, num_matvecs=None, val_tol=1e-8):
    "Everything `eigsh` documents: ascending eigenvalues, orthonormal eigenvectors, residuals ‖Av−λv‖ ≤ tol·‖A‖, converged."
    assert isinstance(r, EigResult)
    n, scale = ev.shape[0], ev.abs().max()
    fct.test_eq(r.eigenvalues.shape, (k,)); fct.test_eq(r.eigenvectors.shape, (n, k))
    fct.test_eq(r.residuals.shape, (k,)); fct.test_eq(r.converged.shape, (k,))
    assert r.converged.dtype == torch.bool and bool(r.converged.all())
    assert bool((r.eigenvalues[1:] >= r.eigenvalues[:-1]).all()), "eigenvalues must be ascending"
    err = (r.eigenvalues - wanted(ev, k, which)).abs().max() / scale
    assert err <= val_tol, f"{which} k={k}: eigenvalue error {err:.2e} (relative to max|λ|)"
    V = r.eigenvectors
    assert (V.T @ V - torch.eye(k, dtype=F64)).abs().max() <= 1e-10, "eigenvectors not orthonormal"
    true_res = (A @ V - V * r.eigenvalues).norm(dim=0)
    assert bool((r.residuals <= tol * scale).all()), f"residuals {r.residuals} above tol·max|λ| = {tol * scale:.2e}"
    # the reported residuals are the true ones (up to rounding)
    assert bool((true_res <= r.residuals + 1e-11 * scale).all()), (true_res, r.residuals)
    assert bool((true_res <= tol * scale + 1e-11 * scale).all())
    if num_matvecs is not None: fct.test_eq(r.num_matvecs, num_matvecs)


# ---------------------------------------------------------------- on a HessianOperator with negative eigenvalues
@pytest.fixture(scope='module')
def saddle_cnn():
    "An untrained tiny CNN (47 parameters): an indefinite Hessian (its most negative eigenvalue is ≈ -0.57, the largest 0.81)."
    model, (x, y) = cnn(), make_data('cnn', n=30)
    H, _, _ = reference(model, CE, [(x, y)])
    ev = torch.linalg.eigvalsh(H)
    assert ev[0] < -0.3 * ev.abs().max()   # strongly negative curvature: SA and BE are meaningful
    return model, (x, y), H, ev

@pytest.mark.parametrize('which', WHICH)
@pytest.mark.parametrize('k', [1, 4])
def test_eigsh_hessian_operator(saddle_cnn, k, which):
    model, (x, y), H, ev = saddle_cnn
    op = HessianOperator(model, CE, (x, y))
    before = op.num_matvecs
    r = eigsh(op, k, which)
    check_eigsh(H, r, ev, k, which, tol=1e-6, num_matvecs=op.num_matvecs - before)
    assert r.num_matvecs < 10 * op.num_params

def test_eigsh_hessian_operator_tight_tol_and_negative_bottom(saddle_cnn):
    model, (x, y), H, ev = saddle_cnn
    op = HessianOperator(model, CE, (x, y), mode='fwd')
    r = eigsh(op, 4, 'BE', tol=1e-10)
    check_eigsh(H, r, ev, 4, 'BE', tol=1e-10, val_tol=1e-10)
    assert r.eigenvalues[0] < 0 < r.eigenvalues[-1]
    # the bottom eigenvector is a direction of negative curvature of the loss
    v = r.eigenvectors[:, 0]
    assert float(v @ (H @ v)) == pytest.approx(float(ev[0]), rel=1e-8)


# ---------------------------------------------------------------- on dense symmetric tensors
@pytest.fixture(scope='module')
def random_sym():
    g = torch.Generator().manual_seed(1)
    B = torch.randn(150, 150, generator=g, dtype=F64)
    A = (B + B.T) / 2
    return A, torch.linalg.eigvalsh(A)

@pytest.mark.parametrize('which', WHICH)
@pytest.mark.parametrize('k', [1, 2, 5])
def test_eigsh_dense(random_sym, k, which):
    A, ev = random_sym
    r = eigsh(A, k, which)
    check_eigsh(A, r, ev, k, which, tol=1e-6)
    r2 = eigsh(DenseOperator(A), k, which)            # a tensor and its operator give the same answer
    assert torch.equal(r.eigenvalues, r2.eigenvalues)

@pytest.mark.parametrize('tol', [1e-4, 1e-9])
def test_eigsh_tolerance_is_honoured(random_sym, tol):
    A, ev = random_sym
    r = eigsh(A, 3, 'LA', tol=tol)
    check_eigsh(A, r, ev, 3, 'LA', tol=tol, val_tol=max(1e-8, tol))

@pytest.mark.parametrize('which,k,evals,expect', [
    # top eigenvalue 5 three times: 'LA' k=3 must return all three copies
    ('LA', 3, [5., 5., 5., 4., 3.] + torch.linspace(-2, 2, 55).tolist(), [5., 5., 5.]),
    ('LA', 5, [5., 5., 5., 4., 3.] + torch.linspace(-2, 2, 55).tolist(), [3., 4., 5., 5., 5.]),
    ('LM', 3, [5., 5., 5., 4., 3.] + torch.linspace(-2, 2, 55).tolist(), [5., 5., 5.]),
    # a doubly repeated negative end and a doubly repeated positive end
    ('SA', 2, [-7., -7.] + torch.linspace(-1, 1, 40).tolist() + [6., 6.], [-7., -7.]),
    ('BE', 4, [-7., -7.] + torch.linspace(-1, 1, 40).tolist() + [6., 6.], [-7., -7., 6., 6.]),
    ('LM', 4, [-7., -7.] + torch.linspace(-1, 1, 40).tolist() + [6., 6.], [-7., -7., 6., 6.]),
    # a fully degenerate cluster at the bottom
    ('SA', 4, [-3.] * 6 + torch.linspace(0, 2, 30).tolist(), [-3.] * 4),
])
def test_eigsh_repeated_eigenvalues(which, k, evals, expect):
    A = sym(evals, seed=2)
    ev = torch.linalg.eigvalsh(A)
    close_expect = torch.tensor(expect, dtype=F64)
    assert (wanted(ev, k, which) - close_expect).abs().max() < 1e-12
    r = eigsh(A, k, which)
    check_eigsh(A, r, ev, k, which, tol=1e-6)

def test_eigsh_repeated_missed_without_verify():
    "The check is what finds the copies: without it, single-vector Lanczos reports the next distinct eigenvalues."
    A = sym([5., 5., 5., 4., 3.] + torch.linspace(-2, 2, 55).tolist(), seed=2)
    r = eigsh(A, 3, 'LA', verify=False)
    assert torch.allclose(r.eigenvalues, torch.tensor([3., 4., 5.], dtype=F64), atol=1e-9)
    assert bool(r.converged.all())            # each pair is a true eigenpair, just not the wanted ones

def test_eigsh_stops_inside_a_cycle(random_sym):
    "Convergence is checked after every product: an eigenvector as warm start converges after one product."
    A, ev = random_sym
    V = torch.linalg.eigh(A).eigenvectors
    r = eigsh(A, 1, 'LA', v0=V[:, -1], verify=False)
    fct.test_eq(r.num_matvecs, 1)
    check_eigsh(A, r, ev, 1, 'LA', tol=1e-6)
    fct.test_eq(eigsh(A, 1, 'LA', v0=V[:, -1]).num_matvecs, 1)   # one pair per end: no check by default
    # with the check, more products confirm nothing larger was missed
    r2 = eigsh(A, 1, 'LA', v0=V[:, -1], verify=True)
    check_eigsh(A, r2, ev, 1, 'LA', tol=1e-6)
    assert 1 < r2.num_matvecs
    # a warm start that *is* the second eigenvector converges to it; the check finds the top one
    assert eigsh(A, 1, 'LA', v0=V[:, -2]).eigenvalues[0] == pytest.approx(float(ev[-2]), rel=1e-8)
    r3 = eigsh(A, 1, 'LA', v0=V[:, -2], verify=True)
    check_eigsh(A, r3, ev, 1, 'LA', tol=1e-6)
    # two pairs at one end: checked by default
    fct.test_ne(eigsh(A, 2, 'LA', v0=V[:, -1]).num_matvecs, eigsh(A, 2, 'LA', v0=V[:, -1], verify=False).num_matvecs)
    # the stop comes mid-cycle: fewer products than a multiple of the basis size
    M = sym(torch.cat([torch.linspace(0, 1, 100), torch.tensor([10., 20.])]).tolist(), seed=5)
    r4 = eigsh(M, 2, 'LA', verify=False, ncv=40, v0=torch.ones(102, dtype=F64))  # a given start may stop before the basis is full
    assert r4.num_matvecs < 40, r4.num_matvecs
    r5 = eigsh(M, 2, 'LA', verify=False, ncv=40)  # a random start stops early when converged to the tighter of tol and 1e-4
    assert 5 <= r5.num_matvecs < 40, r5.num_matvecs
    assert torch.allclose(r5.eigenvalues, torch.tensor([10., 20.], dtype=F64), rtol=1e-10)

def _spectrum(family, seed, n=300):
    g = torch.Generator().manual_seed(seed)
    if family == 'outliers':  # λ_min −0.158 below a bulk in ±0.01, ‖A‖ = 7 (the SaddleCaptureCallback's setting)
        ev = torch.cat([torch.tensor([7., 4., 2.], dtype=F64), torch.rand(n - 5, generator=g, dtype=F64) * 0.02 - 0.01,
                        torch.tensor([-0.158, -0.12], dtype=F64)])
    else:  # Hessian-like: a power-law positive tail, a bulk around 0, six small negative eigenvalues
        i = torch.arange(1, 21, dtype=F64)
        ev = torch.cat([10 * i ** -1.5, torch.randn(n - 26, generator=g, dtype=F64) * 0.005,
                        -0.05 * torch.rand(6, generator=g, dtype=F64) - 0.01])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return torch.sort(ev).values, (Q * ev) @ Q.T

def _cold_solves(monkeypatch, early_tol, family, k, which, tol, seeds=8):
    import fastsprkd.eigen as E
    monkeypatch.setattr(E, '_EARLY_TOL', early_tol)
    bad, used = 0, []
    for seed in range(seeds):
        ev, A = _spectrum(family, seed)
        r = eigsh(A, k, which, tol=tol, seed=seed, verify=False)
        bad += bool((r.eigenvalues - wanted(ev, k, which)).abs().max() > 3 * tol * ev.abs().max())
        used.append(r.num_matvecs)
    return bad, used

def test_eigsh_cold_start_does_not_stop_in_the_bulk(monkeypatch):
    """From a random start a few steps can give converged-looking Ritz values that are not the extreme ones (from the
    bulk, or the far side of it) when the tolerance is loose next to the distances involved. A random start therefore
    fills its first basis unless the wanted pairs meet the tighter of tol and 1e-4 (after ≥ 2k+1 products)."""
    case = ('powerlaw', 5, 'SA', 1e-2)
    bad, used = _cold_solves(monkeypatch, 1.0, *case)   # stopping at the loose tol itself, after 2k+1 products
    assert bad >= 2, (bad, used)                        # wrong λ_min's for 4 of these 8 seeds, after 11-13 products
    bad, used = _cold_solves(monkeypatch, 0.0, *case)   # always filling the first basis (ncv = 21)
    fct.test_eq(bad, 0); fct.test_eq(used, [21] * 8)
    bad, used = _cold_solves(monkeypatch, 1e-4, *case)  # the default rule
    fct.test_eq(bad, 0)
    # where the pairs do converge tightly the default rule stops early, with the right values
    bad, used = _cold_solves(monkeypatch, 1e-4, 'outliers', 2, 'BE', 1e-2, seeds=12)
    fct.test_eq(bad, 0)
    assert max(used) < 16, used                         # filling the first basis: 18 products

@pytest.mark.parametrize('n', [1, 2, 3, 6])
@pytest.mark.parametrize('which', WHICH)
def test_eigsh_tiny_n_k_close_to_n(n, which):
    A = sym(torch.linspace(-1, 2, n).tolist(), seed=n)
    ev = torch.linalg.eigvalsh(A)
    for k in sorted({1, max(1, n - 1), n}):
        check_eigsh(A, eigsh(A, k, which), ev, k, which, tol=1e-6)

def test_eigsh_zero_and_rank_deficient():
    "Invariant subspaces (a rank-2 matrix, the zero matrix) do not stop the iteration early or divide by zero."
    g = torch.Generator().manual_seed(0)
    U = torch.randn(40, 2, generator=g, dtype=F64)
    A = U @ torch.diag(torch.tensor([3., -2.], dtype=F64)) @ U.T
    ev = torch.linalg.eigvalsh(A)
    for which in WHICH: check_eigsh(A, eigsh(A, 4, which), ev, 4, which, tol=1e-6)
    r = eigsh(torch.zeros(10, 10, dtype=F64), 2, 'LA')
    assert torch.isfinite(r.eigenvalues).all() and (r.eigenvalues == 0).all()
    assert (r.eigenvectors.T @ r.eigenvectors - torch.eye(2, dtype=F64)).abs().max() < 1e-12

def test_eigsh_seed_v0_and_global_rng(random_sym):
    A, ev = random_sym
    state = torch.random.get_rng_state()
    r1, r2 = eigsh(A, 2, 'SA', seed=3), eigsh(A, 2, 'SA', seed=3)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues) and torch.equal(r1.eigenvectors, r2.eigenvectors)
    power_iteration(A, 1, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state), "the library must not consume the global torch RNG"
    # a start vector close to the answer converges in fewer products
    v0 = r1.eigenvectors[:, 0] + 1e-3 * torch.ones(A.shape[0], dtype=F64)
    r3 = eigsh(A, 1, 'SA', v0=v0)
    check_eigsh(A, r3, ev, 1, 'SA', tol=1e-6)
    assert r3.num_matvecs < eigsh(A, 1, 'SA').num_matvecs
    # unpacking gives (eigenvalues, eigenvectors)
    vals, vecs = r1
    assert vals is r1.eigenvalues and vecs is r1.eigenvectors

def test_eigsh_max_matvecs_budget(random_sym):
    "A budget too small to converge stops there and says so in `converged` and in a warning (residuals stay honest)."
    A, ev = random_sym
    with pytest.warns(UserWarning, match=r"did not converge to tol=1e-12 within max_matvecs=25 .*raise max_matvecs"):
        r = eigsh(A, 3, 'SA', max_matvecs=25, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        fct.test_eq(eigsh(A, 3, 'SA', max_matvecs=25, tol=1e-12, warn=False).num_matvecs, 25)
        eigsh(A, 3, 'SA')                    # converged: no warning
    fct.test_eq(r.num_matvecs, 25)           # the budget is never exceeded (checked after every product)
    assert not bool(r.converged.all())
    V = r.eigenvectors
    true_res = (A @ V - V * r.eigenvalues).norm(dim=0)
    assert bool((true_res <= r.residuals + 1e-10 * ev.abs().max()).all())

def test_eigsh_progress_bar(random_sym):
    A, ev = random_sym
    check_eigsh(A, eigsh(A, 2, 'LA', progress=True), ev, 2, 'LA', tol=1e-6)

@settings(max_examples=10, deadline=None)
@given(n=st.integers(2, 40), data=st.data(), which=st.sampled_from(WHICH), seed=st.integers(0, 2**16))
def test_eigsh_property_random_spectra(n, data, which, seed):
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(seed)
    evals = (torch.randn(n, generator=g, dtype=F64) * 3).tolist()
    A = sym(evals, seed=seed)
    ev = torch.linalg.eigvalsh(A)
    w = wanted(ev, k, which)
    # skip ambiguous selections ('LM' ties between +a and -a): the k-th and (k+1)-th candidates must be distinct
    if which == 'LM' and k < n:
        mags = ev.abs().sort(descending=True).values
        if mags[k - 1] - mags[k] < 1e-9: return
    check_eigsh(A, eigsh(A, k, which, tol=1e-9), ev, k, which, tol=1e-9)


# ---------------------------------------------------------------- bad input
def test_eigsh_bad_input(random_sym):
    A, _ = random_sym
    n = A.shape[0]
    fct.test_fail(lambda: eigsh(A, n + 1), contains='k must be between 1 and n')
    fct.test_fail(lambda: eigsh(A, 0), contains='k must be between 1 and n')
    fct.test_fail(lambda: eigsh(A, -2, 'SA'), contains=f'n={n}')
    fct.test_fail(lambda: eigsh(A, 2, 'XY'), contains="which must be one of")
    fct.test_fail(lambda: eigsh(A, 2, 'la'), contains="'LA', 'SA', 'LM', 'BE'")
    fct.test_fail(lambda: eigsh(torch.zeros(3, 4, dtype=F64), 1), contains='square')
    fct.test_fail(lambda: eigsh([[1., 0.], [0., 1.]], 1), contains='linear operator')
    fct.test_fail(lambda: eigsh(A, 2, v0=torch.zeros(n, dtype=F64)), contains='zero')
    fct.test_fail(lambda: eigsh(A, 2, v0=torch.ones(n + 1, dtype=F64)), contains='entries')
    fct.test_fail(lambda: power_iteration(A, n + 1), contains='k must be between 1 and n')
    fct.test_fail(lambda: power_iteration(A, 0), contains='k must be between 1 and n')
    fct.test_fail(lambda: eigsh(A, 2, max_matvecs=0), contains='max_matvecs must be ≥ 1')
    fct.test_fail(lambda: eigsh(A, 2, ncv=0), contains='must exceed k')


def test_power_iteration_on_a_null_space_returns_unit_vectors():
    "H·v = 0 after deflation: v itself is an eigenvector (λ = 0), not a zero vector."
    for A in (torch.zeros(6, 6, dtype=F64), torch.diag(torch.tensor([3., 0., 0., 0.], dtype=F64))):
        r = power_iteration(A, 2, seed=0)
        fct.test_close(r.eigenvectors.norm(dim=0), torch.ones(2, dtype=F64), eps=1e-12)
        fct.test_close(A @ r.eigenvectors, r.eigenvectors * r.eigenvalues, eps=1e-12)


# ---------------------------------------------------------------- power iteration (PyHessian's semantics)
def test_power_iteration_is_largest_magnitude():
    "Like PyHessian, power iteration returns the largest-|λ| eigenvalues: a dominant negative one, not the largest."
    A = sym([-10., 3., 2., 1., 0.5, 0.1, -0.2], seed=4)
    r = power_iteration(A, 1, max_iter=1000, tol=1e-10)
    assert r.eigenvalues[0] == pytest.approx(-10., rel=1e-6)
    assert eigsh(A, 1, 'LA').eigenvalues[0] == pytest.approx(3., rel=1e-8)
    r2 = power_iteration(A, 2, max_iter=1000, tol=1e-10)
    assert torch.allclose(r2.eigenvalues, torch.tensor([-10., 3.], dtype=F64), rtol=1e-6)
    V = r2.eigenvectors
    assert (V.T @ V - torch.eye(2, dtype=F64)).abs().max() < 1e-8
    fct.test_eq(r2.num_matvecs > 2, True)

def test_power_iteration_vs_pyhessian():
    "Both agree with the dense reference (largest |λ|) to the accuracy their stopping tolerance implies."
    from pyhessian import hessian as pyh_hessian
    k, tol, max_iter = 2, 1e-5, 2000
    model, (x, y) = cnn(seed=3), make_data('cnn', n=30, seed=3)
    H, _, _ = reference(model, CE, [(x, y)])
    ev = torch.linalg.eigvalsh(H)
    top = ev[ev.abs().argsort(descending=True)]
    # well-separated dominant eigenvalues (|λ2/λ1|, |λ3/λ2| < 0.7): the stopping rule then bounds the error
    assert abs(top[1] / top[0]) < 0.7 and abs(top[2] / top[1]) < 0.7
    ref = top[:k].sort().values
    bound = 20 * tol * top[0].abs()
    # ours, on the float64 operator
    op = HessianOperator(model, CE, (x, y))
    r = power_iteration(op, k, max_iter=max_iter, tol=tol)
    assert (r.eigenvalues - ref).abs().max() <= bound, (r.eigenvalues, ref)
    fct.test_eq(r.num_matvecs, op.num_matvecs)
    assert bool((r.residuals < 0.05 * top[0].abs()).all())
    # PyHessian, on a float32 copy (it draws float32 vectors), with the global RNG seeded
    m32 = copy.deepcopy(model).float()
    torch.manual_seed(0)
    vals, _ = pyh_hessian(m32, CE, data=(x.float(), y), cuda=False).eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    theirs = torch.tensor(sorted(vals), dtype=F64)
    assert (theirs - ref).abs().max() <= bound + 1e-5 * top[0].abs(), (theirs, ref)
    # and with each other
    assert (theirs - r.eigenvalues).abs().max() <= 2 * bound + 1e-5 * top[0].abs()


# ---------------------------------------------------------------- lanczos tridiagonalization
def test_lanczos_tridiagonalization(random_sym):
    A, ev = random_sym
    v0 = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(0), dtype=F64)
    a, b, Q = lanczos(A, v0, 30)
    fct.test_eq((a.shape, b.shape, Q.shape), ((30,), (29,), (A.shape[0], 30)))
    assert (Q.T @ Q - torch.eye(30, dtype=F64)).abs().max() < 1e-12
    T = torch.diag(a) + torch.diag(b, 1) + torch.diag(b, -1)
    assert (Q.T @ A @ Q - T).abs().max() < 1e-10 * ev.abs().max()
    assert torch.allclose(Q[:, 0], v0 / v0.norm(), atol=1e-14)
    # the extreme Ritz values approach the extreme eigenvalues
    theta = torch.linalg.eigvalsh(T)
    assert theta[-1] <= ev[-1] + 1e-10 and theta[0] >= ev[0] - 1e-10
    # a Krylov space exhausted early (rank-1 start in a 3-eigenvalue matrix) stops with an invariant subspace
    A3 = sym([1.] * 10 + [2.] * 10 + [3.] * 10, seed=1)
    a3, b3, Q3 = lanczos(A3, torch.ones(30, dtype=F64), 10)
    fct.test_eq(a3.shape[0], 3); fct.test_eq(Q3.shape, (30, 3))
    assert torch.allclose(torch.linalg.eigvalsh(torch.diag(a3) + torch.diag(b3, 1) + torch.diag(b3, -1)),
                          torch.tensor([1., 2., 3.], dtype=F64), atol=1e-10)


# ------------------------------------------------ precision: float64 Lanczos arithmetic, autocast, half precision (issues 21, 15)
_CNN = {}
def _digits_cnn(width=4, n=256, steps=60):
    "A DigitsCNN trained briefly on the bundled digits (float32), in eval mode, with its batch (a copy of a cached one)."
    if (width, n, steps) in _CNN: return copy.deepcopy(_CNN[width, n, steps])
    from fastsprkd.models import DigitsCNN
    from fastsprkd.data import digits_tensors
    torch.manual_seed(0)
    x, y = digits_tensors()
    x, y = x[:n], y[:n]
    m = DigitsCNN(width)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(steps):
        opt.zero_grad(); nn.functional.cross_entropy(m(x), y).backward(); opt.step()
    m.eval(); m.zero_grad(set_to_none=True)
    _CNN[width, n, steps] = (m, x, y)
    return copy.deepcopy(_CNN[width, n, steps])


def test_float32_model_top5_within_1e7_of_float64_reference():
    "Issue 21: float32 products, float64 Lanczos arithmetic: the top 5 within 1e-7 of the float64 model's dense eigenvalues."
    m, x, y = _digits_cnn()
    H = HessianOperator(copy.deepcopy(m).double(), CE, (x.double(), y)).to_dense()
    ref = torch.linalg.eigvalsh((H + H.T) / 2)[-5:]
    op = HessianOperator(m, CE, (x, y))
    r = eigsh(op, 5)
    r32 = eigsh(op, 5, lanczos_dtype=torch.float32)  # the float32 arithmetic of session 4
    err = lambda r: ((r.eigenvalues.double() - ref).abs() / ref.abs()).max().item()
    assert err(r) <= 1e-7, f"float64 Lanczos: top-5 relative error {err(r):.2g}"
    assert err(r) < err(r32), (err(r), err(r32))
    assert r.num_matvecs <= r32.num_matvecs, "more products than the float32 arithmetic"
    assert r.eigenvalues.dtype == F64 and r.residuals.dtype == F64 and r32.eigenvalues.dtype == torch.float32
    assert r.eigenvectors.dtype == torch.float32 and r.eigenvectors.shape == (op.num_params, 5)


def test_float32_dense_matrix_float64_arithmetic_not_worse():
    A = sym(torch.cat([torch.tensor([50., 40., 30.]), torch.linspace(-1, 1, 197)]).tolist(), seed=3)
    ev = torch.linalg.eigvalsh(A)
    A32 = A.float()
    ev32 = torch.linalg.eigvalsh(A32.double())  # the float32 matrix's own exact eigenvalues
    r, r32 = eigsh(A32, 3), eigsh(A32, 3, lanczos_dtype=torch.float32)
    e, e32 = [((x.eigenvalues.double() - ev32[-3:]).abs() / ev32[-3:]).max().item() for x in (r, r32)]
    assert e <= 1e-7 and e32 <= 1e-7, (e, e32)  # both at the float32 products' round-off
    assert r.num_matvecs <= r32.num_matvecs
    assert ((r.eigenvalues - ev[-3:]).abs() / ev[-3:]).max() <= 1e-6  # vs the float64 matrix: float32 rounding of A


def test_lanczos_dtypes_and_bad_lanczos_dtype():
    A = sym(torch.linspace(1, 30, 30).tolist()).float()
    al, be, Q = lanczos(A, torch.ones(30), 10)
    assert al.dtype == be.dtype == F64 and Q.dtype == torch.float32
    al2, _, _ = lanczos(A, torch.ones(30), 10, lanczos_dtype=torch.float32)
    assert al2.dtype == torch.float32
    for bad in (torch.bfloat16, torch.float16, 'float64', torch.int64):
        fct.test_fail(lambda: eigsh(A, 1, lanczos_dtype=bad), contains='lanczos_dtype')
        fct.test_fail(lambda: lanczos(A, torch.ones(30), 5, lanczos_dtype=bad), contains='lanczos_dtype')


def test_eigsh_inside_bf16_autocast_equals_outside():
    "Issue 15 item 4: inside a CPU bf16 autocast region eigsh computes exactly what it computes outside (was: addmv dtype error)."
    model, (x, y) = mlp(), make_data('mlp')
    model = model.float(); x = x.float()
    op = HessianOperator(model, CE, (x, y))
    out = eigsh(op, 2, 'BE')
    with torch.autocast('cpu', torch.bfloat16):
        inside = eigsh(op, 2, 'BE')
        pw = power_iteration(op, 2)
    assert torch.equal(out.eigenvalues, inside.eigenvalues) and torch.equal(out.eigenvectors, inside.eigenvectors)
    assert out.num_matvecs == inside.num_matvecs
    torch.testing.assert_close(pw.eigenvalues, power_iteration(op, 2).eigenvalues, rtol=0, atol=0)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_model_eigsh(dtype):
    "Issue 15 item 4: a bf16/fp16 model's operator works with eigsh (float64 arithmetic, said once), close to float32's answer."
    import fastsprkd.eigen as E
    m, x, y = _digits_cnn()
    ref = eigsh(HessianOperator(m, CE, (x, y)), 3).eigenvalues
    mh = copy.deepcopy(m).to(dtype)
    op = HessianOperator(mh, CE, (x.to(dtype), y))
    E._warned_low.discard(dtype)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        r = eigsh(op, 3, tol=1e-2, warn=False)
        eigsh(op, 1, tol=1e-2, warn=False)
    said = [str(x.message) for x in w if 'Lanczos' in str(x.message)]
    assert len(said) == 1 and str(dtype) in said[0] and 'float64' in said[0], said
    assert r.eigenvalues.dtype == F64 and r.eigenvectors.dtype == dtype
    rel = ((r.eigenvalues - ref.double()).abs() / ref.double().abs()).max().item()
    assert rel <= 0.05, f"{dtype} model: top-3 off the float32 model's by {rel:.2g} (more than half-precision noise)"


@pytest.mark.parametrize('tol', [-1, 0, 0., 1., 2.5, float('nan'), float('inf'), '1e-3', True])
def test_eigsh_refuses_bad_tol(tol):
    "Issue 19: a non-positive (or ≥ 1, NaN, non-number) tolerance is refused before any product, naming the range."
    A = sym([1., 2., 3., 4.])
    op = DenseOperator(A)
    fct.test_fail(lambda: eigsh(op, 1, tol=tol), contains='0 < tol < 1')
    fct.test_fail(lambda: power_iteration(op, 1, tol=tol), contains='0 < tol < 1')
    assert op.num_matvecs == 0
