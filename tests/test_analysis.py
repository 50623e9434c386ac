import math, warnings
import pytest, torch
from torch import nn
import fastcore.test as fct
from conftest import DEVICES
from fastsprkd.core import HessianOperator
from fastsprkd.data import digits_tensors
from fastsprkd.estimators import Estimate
from fastsprkd.analysis import (BasinVolume, basin_volume, log_unit_ball_volume, influence, per_sample_gradients,
                                plot_influence, LossLandscape, loss_landscape, gradient_correlation, directional_sharpness)

D = torch.float64


def model_state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()], [p.requires_grad for p in model.parameters()])


def assert_same_state(model, before):
    sd, modes, grads, flags = before
    for k, v in model.state_dict().items(): assert torch.equal(v, sd[k]), k
    assert [m.training for m in model.modules()] == modes
    for p, g in zip(model.parameters(), grads): assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert [p.requires_grad for p in model.parameters()] == flags


# ---------------------------------------------------------------- basin volume
def test_basin_volume_reproduces_the_notebook_arithmetic():
    # SPEC §5: n = 1,710, T = 2, shift 4 + 1e-5, ½·log det(H + c·I) = 1190.599 (the notebook's Hessian)
    st = basin_volume(2 * 1190.599, n=1710, threshold=2., shift=4 + 1e-5, stirling=True)
    assert isinstance(st, BasinVolume) and st.stirling
    fct.test_close(st.log_unit_ball, -3942.742, eps=5e-4)
    fct.test_close(st.threshold_term, 1185.282, eps=5e-4)
    fct.test_close(st.half_logdet, 1190.599, eps=1e-9)
    fct.test_close(st.log_volume, -3948.059, eps=1e-3)
    ex = basin_volume(2 * 1190.599, n=1710)  # the default: log V_n exactly (lgamma)
    assert not ex.stirling
    fct.test_close(ex.log_unit_ball, 1710 / 2 * math.log(math.pi) - math.lgamma(1710 / 2 + 1), eps=1e-9)
    fct.test_close(ex.log_volume, -3948.059, eps=1e-3)
    fct.test_close(ex.log_volume - st.log_volume, -1 / (6 * 1710), eps=1e-6)
    fct.test_close(ex.log_volume, ex.log_unit_ball + ex.threshold_term - ex.half_logdet, eps=1e-9)


def test_unit_ball_volume_small_n():
    fct.test_close(math.exp(log_unit_ball_volume(1)), 2., eps=1e-12)
    fct.test_close(math.exp(log_unit_ball_volume(2)), math.pi, eps=1e-12)
    fct.test_close(math.exp(log_unit_ball_volume(3)), 4 / 3 * math.pi, eps=1e-12)


def test_basin_volume_from_an_operator_is_the_ellipsoid_volume():
    lam = torch.tensor([0.5, 1., 3.], dtype=D)
    H = torch.diag(lam)
    bv = basin_volume(H, threshold=1.5, shift=0.25)
    # {δ : ½δᵀAδ ≤ T} has semi-axes √(2T/aᵢ): volume 4/3·π·∏ √(2T/aᵢ)
    vol = 4 / 3 * math.pi * torch.sqrt(2 * 1.5 / (lam + 0.25)).prod().item()
    fct.test_close(bv.log_volume, math.log(vol), eps=1e-10)
    assert bv.n == 3 and bv.stderr == 0


def test_basin_volume_slq_and_estimate_inputs():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=D)).Q
    lam = torch.rand(120, generator=g, dtype=D) * 3
    H = (U * lam) @ U.T
    ex = basin_volume(H)
    slq = basin_volume(H, method='slq', num_probes=30, num_steps=20)
    assert slq.stderr > 0 and slq.num_matvecs == 600
    assert abs(slq.log_volume - ex.log_volume) <= 4 * slq.stderr
    est = Estimate(2 * ex.half_logdet, 0., 0)
    fct.test_close(basin_volume(est, n=120).log_volume, ex.log_volume, eps=1e-9)


def test_basin_volume_zero_and_negative_eigenvalues_rule():
    H = torch.diag(torch.tensor([-3., 0., 0., 2.], dtype=D))  # singular and indefinite, like a trained net's Hessian
    fct.test_fail(lambda: basin_volume(H, shift=1.), contains='smallest eigenvalue is -2')
    fct.test_fail(lambda: basin_volume(H, shift=3.), contains='Use a shift above 3')
    fct.test_fail(lambda: basin_volume(H, shift=1., method='slq', num_steps=4), contains='smallest Ritz value')
    bv = basin_volume(H, shift=4 + 1e-5)  # the default shift makes it positive definite: finite
    assert math.isfinite(bv.log_volume)
    Z = torch.zeros(5, 5, dtype=D)  # det(H) = 0: the shift alone gives the volume
    fct.test_close(basin_volume(Z, shift=4.).half_logdet, 0.5 * 5 * math.log(4.), eps=1e-12)
    for bad in (float('nan'), float('-inf')):
        fct.test_fail(lambda: basin_volume(bad, n=4), contains='not positive definite')


def test_basin_volume_bad_input():
    fct.test_fail(lambda: basin_volume(10.), contains='pass `n`')
    fct.test_fail(lambda: basin_volume(torch.eye(3, dtype=D), n=4), contains='does not match')
    fct.test_fail(lambda: basin_volume(torch.eye(3, dtype=D), threshold=0.), contains='threshold')
    fct.test_fail(lambda: basin_volume(torch.eye(3, dtype=D), method='mc'), contains="'exact' or 'slq'")
    fct.test_fail(lambda: basin_volume(10., n=3.9), contains='n must be a positive integer')


def test_basin_volume_takes_any_real_scalar_log_determinant():
    import numpy as np
    A = torch.diag(torch.tensor([1., 2., 3.], dtype=D))
    ref = basin_volume(A, shift=0.5)
    ld = torch.logdet(A + 0.5 * torch.eye(3, dtype=D))
    for given in (ld, ld.item(), np.float32(ld.item()), np.float64(ld.item())):
        fct.test_close(basin_volume(given, n=3, shift=0.5).log_volume, ref.log_volume, eps=1e-6)


# ---------------------------------------------------------------- influence
def digits_1_vs_7(n_train=250):
    x, y = digits_tensors()
    keep = (y == 1) | (y == 7)
    X, Y = x[keep].flatten(1).double(), (y[keep] == 7).double()[:, None]
    return X[:n_train], Y[:n_train], X[n_train:], Y[n_train:]


def newton_logreg(X, Y, lam, w=None, theta=None, iters=50):
    "Minimize (1/N)·Σ wᵢ·BCE(xᵢ) + (λ/2)‖θ‖² (θ = weights and bias) by Newton's method in float64."
    N = X.shape[0]
    Xa = torch.cat([X, torch.ones(N, 1, dtype=D)], 1)
    w = torch.ones(N, dtype=D) if w is None else w
    theta = torch.zeros(Xa.shape[1], dtype=D) if theta is None else theta.clone()
    for _ in range(iters):
        p = torch.sigmoid(Xa @ theta)
        g = Xa.T @ (w * (p - Y[:, 0])) / N + lam * theta
        Hm = (Xa.T * (w * p * (1 - p))) @ Xa / N + lam * torch.eye(len(theta), dtype=D)
        step = torch.linalg.solve(Hm, g)
        theta = theta - step
        if step.norm() < 1e-13: break
    return theta


def test_influence_predicts_leave_one_out_retraining():
    "Koh & Liang's validation: predicted vs actual change of a test loss when removing each of the 30 most influential points."
    Xtr, Ytr, Xte, Yte = digits_1_vs_7()
    N, lam = len(Xtr), 1e-2
    theta = newton_logreg(Xtr, Ytr, lam)
    model = nn.Linear(64, 1).double()
    with torch.no_grad(): model.weight.copy_(theta[:64][None]); model.bias.copy_(theta[64:])
    bce = nn.BCEWithLogitsLoss()
    def test_loss(th, j): return nn.functional.binary_cross_entropy_with_logits(Xte[j] @ th[:64] + th[64], Yte[j, 0]).item()
    losses = nn.functional.binary_cross_entropy_with_logits(Xte @ theta[:64] + theta[64], Yte[:, 0], reduction='none')
    for j in (losses.argmax().item(), 0):  # the worst-classified test point and an ordinary one
        I = influence(model, bce, (Xtr, Ytr), (Xte[j:j+1], Yte[j:j+1]), damping=lam).scores[:, 0]  # L2 term's Hessian = lam·I
        predicted = -I / N  # removing a point is upweighting it by −1/N
        top = I.abs().argsort(descending=True)[:30]
        actual = []
        for i in top.tolist():
            w = torch.ones(N, dtype=D); w[i] = 0
            actual.append(test_loss(newton_logreg(Xtr, Ytr, lam, w, theta), j) - test_loss(theta, j))
        actual = torch.tensor(actual, dtype=D)
        r = torch.corrcoef(torch.stack([predicted[top], actual]))[0, 1].item()
        assert r >= 0.95, r
        assert (torch.sign(predicted[top]) == torch.sign(actual)).float().mean() >= 0.9


def test_influence_methods_agree_rows_in_order_and_no_trace():
    Xtr, Ytr, Xte, Yte = digits_1_vs_7(96)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    bce = nn.BCEWithLogitsLoss()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model.train()
    before = model_state(model)
    damping = 1.  # above −λ_min of this small network's Hessian
    test = (Xte[:5], Yte[:5])
    I_exact = influence(model, bce, (Xtr, Ytr), test, damping=damping, method='exact').scores
    assert I_exact.shape == (96, 5)
    I_cg = influence(model, bce, (Xtr, Ytr), test, damping=damping, method='cg', tol=1e-10).scores
    fct.test_close(I_cg, I_exact, eps=1e-8)
    I_lissa = influence(model, bce, (Xtr, Ytr), test, damping=damping, method='lissa', tol=1e-10).scores
    fct.test_close(I_lissa, I_exact, eps=1e-6)
    # a DataLoader in batches gives the same rows, in dataset order
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, Ytr), batch_size=32)
    fct.test_close(influence(model, bce, dl, [test], damping=damping, method='exact').scores, I_exact, eps=1e-10)
    # definition, row by row
    H = HessianOperator(model, bce, (Xtr, Ytr)).to_dense()
    G = per_sample_gradients(model, bce, (Xtr, Ytr)); Gt = per_sample_gradients(model, bce, test)
    fct.test_close(I_exact, -G @ torch.linalg.solve(H + damping * torch.eye(len(H), dtype=D), Gt.T), eps=1e-10)
    assert_same_state(model, before)


def test_per_sample_gradients_match_a_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x, y = torch.randn(7, 3, dtype=D), torch.randint(0, 2, (7,))
    G = per_sample_gradients(model, nn.CrossEntropyLoss(), (x, y))
    for i in range(7):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i+1]), y[i:i+1]).backward()
        fct.test_close(G[i], torch.cat([p.grad.reshape(-1) for p in model.parameters()]), eps=1e-12)


def test_influence_on_a_parameter_subset():
    "The inverse-HVP notebook froze the front of the network: the last layer's block only."
    Xtr, Ytr, Xte, Yte = digits_1_vs_7(80)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 1)).double()
    bce = nn.BCEWithLogitsLoss()
    I = influence(model, bce, (Xtr, Ytr), (Xte[:3], Yte[:3]), params=model[2], damping=0.01, method='cg', tol=1e-10).scores
    H = HessianOperator(model, bce, (Xtr, Ytr), params=model[2]).to_dense()
    assert H.shape == (7, 7)
    G = per_sample_gradients(model, bce, (Xtr, Ytr), params=['2.weight', '2.bias'])
    Gt = per_sample_gradients(model, bce, (Xte[:3], Yte[:3]), params=model[2])
    fct.test_close(I, -G @ torch.linalg.solve(H + 0.01 * torch.eye(7, dtype=D), Gt.T), eps=1e-8)


def test_influence_bad_input():
    Xtr, Ytr, Xte, Yte = digits_1_vs_7(40)
    model, bce = nn.Linear(64, 1).double(), nn.BCEWithLogitsLoss()
    fct.test_fail(lambda: influence(model, bce, (Xtr, Ytr), [], damping=0.1), contains='empty')
    fct.test_fail(lambda: influence(model, bce, (Xtr, Ytr), (Xte[:0], Yte[:0]), damping=0.1), contains='empty')
    fct.test_fail(lambda: influence(model, bce, [], (Xte, Yte), damping=0.1), contains='empty')
    fct.test_fail(lambda: influence(model, bce, (Xtr, Ytr), (Xte, Yte), method='newton'), contains="'cg', 'lissa' or 'exact'")
    from torch.utils.data import DataLoader, TensorDataset
    fct.test_fail(lambda: influence(model, bce, DataLoader(TensorDataset(Xtr, Ytr), batch_size=8, shuffle=True), (Xte, Yte)),
                  contains='shuffle=False')


def test_influence_from_one_shot_iterators():
    "A generator of training batches is read once (by the operator) and still gives every row, in order."
    Xtr, Ytr, Xte, Yte = digits_1_vs_7(40)
    torch.manual_seed(0)
    model, bce = nn.Linear(64, 1).double(), nn.BCEWithLogitsLoss()
    batches = [(Xtr[:25], Ytr[:25]), (Xtr[25:], Ytr[25:])]
    ref = influence(model, bce, batches, (Xte, Yte), damping=0.1, method='exact').scores
    fct.test_eq(ref.shape, (40, len(Xte)))
    for data in (iter(batches), (b for b in batches)):
        fct.test_close(influence(model, bce, data, (Xte, Yte), damping=0.1, method='exact').scores, ref, eps=1e-12)
    fct.test_fail(lambda: plot_influence([1., 2.], [1.]), contains='same length')


def test_plot_influence_returns_ax():
    import matplotlib; matplotlib.use('Agg')
    ax = plot_influence(torch.tensor([1., 2., 3.]), torch.tensor([1.1, 1.9, 3.2]))
    assert 'Pearson r' in ax.get_title()


# ---------------------------------------------------------------- loss landscape
def small_cnn_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    x, y = digits_tensors()
    return model, nn.CrossEntropyLoss(), (x[:128], y[:128])


def test_loss_landscape_1d_restores_parameters_exactly():
    model, ce, data = small_cnn_and_data()
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = model_state(model)
    ls = loss_landscape(model, ce, data, 'random')
    assert isinstance(ls, LossLandscape) and ls.losses.shape == (21,) and ls.betas is None
    assert_same_state(model, before)
    model.eval()
    fct.test_close(ls.losses[10].item(), ce(model(data[0]), data[1]).item(), eps=1e-5)  # α = 0 is the current loss


def test_random_direction_is_filter_normalized():
    model, ce, data = small_cnn_and_data()
    d = loss_landscape(model, ce, data, 'random', alphas=[0.]).directions[0]
    op = HessianOperator(model, ce, data)
    for t, p in zip(op.unflatten(d), op.params):
        if p.dim() <= 1: assert t.abs().max() == 0  # biases and BatchNorm: ignored, as in Li et al.
        else: fct.test_close(t.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), eps=1e-5)
    # and the loss at α·d matches a manual evaluation
    ls = loss_landscape(model, ce, data, d, alphas=[0.3])
    with torch.no_grad():
        for p, t in zip(op.params, op.unflatten(d)): p.add_(0.3 * t)
        model.eval(); expected = ce(model(data[0]), data[1]).item()
        for p, t in zip(op.params, op.unflatten(d)): p.sub_(0.3 * t)
    fct.test_close(ls.losses[0].item(), expected, eps=1e-5)


def test_gradient_and_top_eigenvector_directions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(30, 4, dtype=D), torch.randint(0, 3, (30,))
    ce = nn.CrossEntropyLoss()
    op = HessianOperator(model, ce, (x, y))
    g = op.gradient()
    ls = loss_landscape(model, ce, (x, y), 'gradient', alphas=torch.linspace(-1e-3, 1e-3, 3))
    fct.test_close(ls.directions[0], g / g.norm(), eps=1e-12)
    fct.test_close((ls.losses[2] - ls.losses[0]) / 2e-3, g.norm().item(), eps=1e-5)  # slope = ‖g‖
    ev, V = torch.linalg.eigh(op.to_dense())
    ls = loss_landscape(model, ce, (x, y), 'top_eigenvector', alphas=torch.linspace(-1e-2, 1e-2, 3))
    fct.test_close(abs(torch.dot(ls.directions[0], V[:, -1]).item()), 1., eps=1e-6)
    curv = (ls.losses[0] - 2 * ls.losses[1] + ls.losses[2]) / 1e-4  # second difference ≈ λ_max
    fct.test_close(curv.item(), ev[-1].item(), eps=1e-3 * max(1., ev[-1].item()))
    two = loss_landscape(model, ce, (x, y), 'top_eigenvector', alphas=[0.], betas=[0.])
    fct.test_close(abs(torch.dot(two.directions[1], V[:, -2]).item()), 1., eps=1e-5)
    pair = loss_landscape(model, ce, (x, y), ('top_eigenvector', 'top_eigenvector'), alphas=[0.], betas=[0.])  # the same two
    fct.test_close(abs(torch.dot(pair.directions[1], V[:, -2]).item()), 1., eps=1e-5)


def test_loss_landscape_2d_and_plots():
    import matplotlib; matplotlib.use('Agg')
    model, ce, data = small_cnn_and_data()
    ls = loss_landscape(model, ce, data, ('gradient', 'random'), alphas=torch.linspace(-1, 1, 5), betas=torch.linspace(-1, 1, 4))
    assert ls.losses.shape == (5, 4) and ls.names == ['gradient', 'random']
    assert ls.plot().get_ylabel().startswith('β')
    ls1 = loss_landscape(model, ce, data, 'random', alphas=torch.linspace(-1, 1, 5), normalize='unit')
    fct.test_close(ls1.directions[0].norm().item(), 1., eps=1e-5)
    assert ls1.plot().get_ylabel() == 'loss'


def test_loss_landscape_parameter_subset_and_restore_on_error():
    model, ce, data = small_cnn_and_data()
    before = model_state(model)
    ls = loss_landscape(model, ce, data, 'random', params=model[4], alphas=[0., 1.])
    assert ls.directions[0].shape == (256 * 10 + 10,)
    calls = []
    def bad_loss(pred, y):
        calls.append(1)
        if len(calls) > 3: raise RuntimeError('loss failed')
        return ce(pred, y)
    fct.test_fail(lambda: loss_landscape(model, bad_loss, data, 'random'), contains='loss failed')
    assert_same_state(model, before)


def test_loss_landscape_records_overflow_as_gaps():
    "Far steps where the loss overflows are NaN gaps (with a warning), not an error that loses the whole landscape."
    model, ce, data = small_cnn_and_data()
    with pytest.warns(UserWarning, match=r'not finite at 2 of 3 grid points'):
        ls = loss_landscape(model, ce, data, 'random', alphas=[-1e30, 0., 1e30])
    assert ls.losses[0].isnan() and ls.losses[2].isnan() and torch.isfinite(ls.losses[1])


def test_loss_landscape_bad_input():
    model, ce, data = small_cnn_and_data()
    fct.test_fail(lambda: loss_landscape(model, ce, data, 'hessian'), contains='unknown direction')
    fct.test_fail(lambda: loss_landscape(model, ce, data, 'gradient', betas=[0.]), contains="'gradient' gives one direction")
    fct.test_fail(lambda: loss_landscape(model, ce, data, torch.ones(3)), contains='flat tensor')
    fct.test_fail(lambda: loss_landscape(model, ce, data, alphas=[]), contains='empty')
    fct.test_fail(lambda: loss_landscape(model, ce, data, normalize='layer'), contains='normalize')
    fct.test_fail(lambda: loss_landscape(model, ce, [], 'random'), contains='empty')
    fct.test_fail(lambda: loss_landscape(model, ce, data, ('gradient', 'gradient'), betas=[0.]), contains="'gradient' gives one direction")
    d = torch.randn(sum(p.numel() for p in model.parameters()), dtype=D)
    fct.test_fail(lambda: loss_landscape(model, ce, data, (d, 2 * d), betas=[0.]), contains='parallel')
    biases = [n for n, p in model.named_parameters() if p.dim() == 1]
    fct.test_fail(lambda: loss_landscape(model, ce, data, 'random', params=biases), contains="normalize='unit'")
    ls = loss_landscape(model, ce, data, 'random', params=biases, normalize='unit', alphas=[0., 1.])
    assert ls.losses[0] != ls.losses[1]


# ---------------------------------------------------------------- sharpness
def test_directional_sharpness_equals_dense_quadratic_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).double()
    x, y = digits_tensors()
    x, y = x[:64].double(), y[:64]
    ce = nn.CrossEntropyLoss()
    names = [n for n, _ in model.named_parameters()]
    op = HessianOperator(model, ce, (x, y))
    def loss_of(flat): return ce(torch.func.functional_call(model, dict(zip(names, op.unflatten(flat))), (x,)), y)
    theta = op.flatten([p.detach() for p in model.parameters()])
    H = torch.func.hessian(loss_of)(theta)
    g = torch.func.grad(loss_of)(theta)
    # one SGD step, as in the sharpness notebook, given as per-parameter tensors
    model.zero_grad(); ce(model(x), y).backward()
    update = [-0.1 * p.grad for p in model.parameters()]
    u = torch.cat([t.reshape(-1) for t in update])
    fct.test_close(directional_sharpness(op, update), (u @ H @ u).item(), eps=1e-10)
    fct.test_close(directional_sharpness(op, u, normalize=True), ((u @ H @ u) / (u @ u)).item(), eps=1e-10)
    fct.test_close(directional_sharpness(H, u), (u @ H @ u).item(), eps=1e-10)
    fct.test_close(gradient_correlation([p.grad for p in model.parameters()], update), (g @ u).item(), eps=1e-12)
    fct.test_close(gradient_correlation(g, u), -0.1 * (g @ g).item(), eps=1e-12)
    assert gradient_correlation(g, u) < 0  # a descent step


def test_sharpness_bad_input():
    H = torch.eye(4, dtype=D)
    fct.test_fail(lambda: directional_sharpness(H, torch.ones(3)), contains='has 3 entries')
    fct.test_fail(lambda: directional_sharpness(H, torch.zeros(4), normalize=True), contains='zero')
    fct.test_fail(lambda: gradient_correlation(torch.ones(4), torch.ones(5)), contains='different sizes')
    fct.test_fail(lambda: gradient_correlation([], torch.ones(5)), contains='non-empty list')



def test_influence_float32_default_tol_is_reachable():
    "influence's default tolerance follows the dtype: a float32 model does not warn about an unreachable 1e-8."
    Xtr, Ytr, Xte, Yte = digits_1_vs_7(40)
    torch.manual_seed(0)
    model = nn.Linear(64, 1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        I = influence(model, nn.BCEWithLogitsLoss(), (Xtr.float(), Ytr.float()), (Xte[:3].float(), Yte[:3].float()), damping=0.1).scores
    ref = influence(model.double(), nn.BCEWithLogitsLoss(), (Xtr, Ytr), (Xte[:3], Yte[:3]), damping=0.1, method='exact').scores
    fct.test_close(I.double(), ref, eps=1e-3 * ref.abs().max().item())


def test_landscape_pair_of_per_parameter_directions():
    model, ce, data = small_cnn_and_data()
    g = torch.Generator().manual_seed(0)
    d1 = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    d2 = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    ls = loss_landscape(model, ce, data, (d1, d2), alphas=[0., 0.1], betas=[0., 0.1], normalize='none')
    flat = lambda d: torch.cat([t.reshape(-1) for t in d]).double()
    fct.test_close(ls.directions[0].double(), flat(d1)); fct.test_close(ls.directions[1].double(), flat(d2))
    fct.test_eq(ls.losses.shape, (2, 2))



def test_influence_on_a_fastai_training_loader_uses_the_clean_items():
    "A training-only augmentation (+100 on x) is off for the Hessian and for the rows alike: the influence of the clean items."
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemTransform
    class TrainOnly(ItemTransform):
        split_idx = 0
        def encodes(self, o): return (o[0] + 100., o[1])
    torch.manual_seed(0)
    X, Y = torch.randn(64, 4, dtype=D), torch.randint(0, 3, (64,))
    dls = Datasets(list(range(64)), [[lambda i: X[i]], [lambda i: Y[i]]], splits=[list(range(48)), list(range(48, 64))]
                  ).dataloaders(bs=16, after_item=[TrainOnly()], device='cpu', num_workers=0)
    m = nn.Linear(4, 3).double()
    test = (X[48:52], Y[48:52])
    ref = influence(m, nn.CrossEntropyLoss(), [(X[:48], Y[:48])], test, method='exact').scores
    fct.test_close(influence(m, nn.CrossEntropyLoss(), dls.train, test, method='exact').scores, ref, eps=1e-10)


def test_per_sample_gradients_use_the_operators_loss():
    """The per-sample loss is core's `functional_loss`: a tuple output without `output_fn` is the operators' error naming the
    fix, and the rows' mean is the gradient of `functional_loss` on the whole batch (a mean loss)."""
    from fastsprkd.core import functional_loss
    torch.manual_seed(0)
    class Pair(nn.Module):
        def __init__(self): super().__init__(); self.fc = nn.Linear(3, 2)
        def forward(self, x): return self.fc(x), x
    m = Pair().double(); x, y = torch.randn(5, 3, dtype=D), torch.randint(0, 2, (5,))
    lf = nn.functional.cross_entropy
    with pytest.raises(TypeError, match=r"output_fn=lambda out: out\[0\]"): per_sample_gradients(m, lf, (x, y))
    G = per_sample_gradients(m, lf, (x, y), output_fn=lambda out: out[0])
    names = [n for n, _ in m.named_parameters()]
    L = functional_loss(m, lf, names, {}, output_fn=lambda out: out[0])
    g = torch.func.grad(L)(tuple(p.detach() for p in m.parameters()), (x,), (y,))
    torch.testing.assert_close(G.mean(0), torch.cat([t.reshape(-1) for t in g]))
    assert type(G) is torch.Tensor and G.shape == (5, 8)
