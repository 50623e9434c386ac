"""Influence against exact leave-one-out (LOO) retraining in the convex case (issue 17): the features of a smooth digits CNN
frozen, its last layer a regularized logistic regression retrained exactly (Newton, float64) without each of the 30 training
points of largest |influence|, for two test points (97th and 90th percentile of the test loss). Koh & Liang's convention:
removing a point changes the test loss by about −I_up,loss/N. On 1,400 training points the first-order prediction reaches
r ≈ 0.999 (2026-12-02); the issue asks r ≥ 0.95. (With 400 training points the removals are less local, r = 0.95 / 0.91:
bench/influence_loo.py, which also runs the non-convex procedure.)"""
import torch, pytest
import torch.nn.functional as F
from torch import nn
from fastsprkd.data import digits_tensors
from fastsprkd.analysis import influence

D, WD, N_FEAT, N_TRAIN, TOP = torch.float64, 5e-3, 400, 1400, 30


class SmoothDigitsCNN(nn.Module):
    "DigitsCNN(width=8)'s layers (1,898 parameters) with SiLU and average pooling (a smooth objective)."
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Linear(64, 10)
    def features(self, x):
        x = F.avg_pool2d(F.silu(self.conv1(x)), 2)
        return F.avg_pool2d(F.silu(self.conv2(x)), 2).flatten(1)
    def forward(self, x): return self.fc(self.features(x))


def newton_fc(P, Y, W, w, iters=30):
    "Exact minimizer of (1/N)·Σ wᵢ·CE(W·[φᵢ, 1]) + (WD/2)·‖W‖² (W: 10 × 65, weight and bias) by Newton's method."
    Pa = torch.cat([P, torch.ones(len(P), 1, dtype=D)], 1); K, d = W.shape
    for _ in range(iters):
        p = F.softmax(Pa @ W.T, -1)
        g = ((w[:, None] * (p - F.one_hot(Y, K).to(D))).T @ Pa / len(P) + WD * W).flatten()
        L = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        H = torch.einsum('nab,ni,nj->aibj', w[:, None, None] * L, Pa, Pa).reshape(K * d, K * d) / len(P) + WD * torch.eye(K * d, dtype=D)
        step = torch.linalg.solve(H, g).view(K, d)
        W = W - step
        if step.abs().max() < 1e-13: return W
    raise AssertionError(f"Newton did not converge: last step {step.abs().max().item():.1e}")


@pytest.fixture(scope='module')
def features():
    "Features of a CNN trained (Adam, then L-BFGS) on 400 digits; the convex problem uses them for 1,400 others' split."
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = x.double()
    torch.manual_seed(0)
    model = SmoothDigitsCNN().double()
    Xf, Yf = x[perm[:N_FEAT]], y[perm[:N_FEAT]]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad(); (F.cross_entropy(model(Xf), Yf) + WD / 2 * sum(p.pow(2).sum() for p in model.parameters())).backward(); opt.step()
    with torch.no_grad(): phi = model.features(x)
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    return phi[tr], y[tr], phi[te], y[te], torch.cat([model.fc.weight, model.fc.bias[:, None]], 1).detach()


def test_convex_last_layer_influence_predicts_exact_loo_retraining(features):
    P, Y, Pte, Yte, W = features
    N = len(P)
    W0 = newton_fc(P, Y, W, torch.ones(N, dtype=D))
    lin = nn.Linear(64, 10).double()
    with torch.no_grad(): lin.weight.copy_(W0[:, :64]); lin.bias.copy_(W0[:, 64])
    with torch.no_grad(): lt = F.cross_entropy(lin(Pte), Yte, reduction='none')
    order = lt.argsort()
    js = [order[int(len(order) * 0.97)].item(), order[int(len(order) * 0.90)].item()]
    res = influence(lin, nn.CrossEntropyLoss(), (P, Y), (Pte[js], Yte[js]), damping=WD)  # damping: the L2 term's Hessian
    assert res.converged and res.residual <= 1e-8, res
    def test_loss(Wi, j): return F.cross_entropy((torch.cat([Pte[j], torch.ones(1, dtype=D)]) @ Wi.T)[None], Yte[j:j+1]).item()
    rs = []
    for c, j in enumerate(js):
        top = res.scores[:, c].abs().argsort(descending=True)[:TOP]
        actual = []
        for i in top.tolist():
            w = torch.ones(N, dtype=D); w[i] = 0
            actual.append(test_loss(newton_fc(P, Y, W0, w), j) - test_loss(W0, j))
        predicted = -res.scores[top, c] / N
        rs.append(torch.corrcoef(torch.stack([predicted, torch.tensor(actual, dtype=D)]))[0, 1].item())
        # the sign and the scale too, not only the correlation: within 25% of the actual changes overall (measured 16%: the
        # largest removal is under-predicted, first order)
        a = torch.tensor(actual, dtype=D)
        assert (predicted - a).norm() <= 0.25 * a.norm(), (predicted, a)
    assert min(rs) >= 0.95, rs
