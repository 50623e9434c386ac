"K-FAC / EK-FAC (fastsprkd.kfac): curvlinops 3.0.1 as the oracle, exact references for the single-layer case, the fallback block, inverse, logdet, trace, save/load, bad input."
import os, warnings
import pytest
import torch
from torch import nn
from fastsprkd.kfac import KFACOperator, EKFACOperator
from fastsprkd.core import GGNOperator, EFOperator

curvlinops = pytest.importorskip('curvlinops')  # an installed test dependency; the comparisons need it
D = torch.float64


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double().eval()

def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8, 3)).double().eval()

class _Seq(nn.Module):
    "A Linear shared over 3 positions (weight sharing), mean-pooled, then a classifier."
    def __init__(self):
        super().__init__(); torch.manual_seed(2)
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
    def forward(self, x): return self.b(torch.tanh(self.a(x)).mean(1))

def _data(kind, n=40, sizes=(16, 16, 8)):
    g = torch.Generator().manual_seed(3)
    if kind == 'mlp': X, C = torch.randn(n, 6, generator=g, dtype=D), 4
    elif kind == 'seq': X, C = torch.randn(n, 3, 4, generator=g, dtype=D), 3
    else: X, C = torch.randn(n, 2, 6, 6, generator=g, dtype=D), 3
    Y = torch.randint(0, C, (n,), generator=g)
    out, s = [], 0
    for b in sizes: out.append((X[s:s+b], Y[s:s+b])); s += b
    return out

_MODELS = {'mlp': _mlp, 'cnn': _cnn, 'seq': lambda: _Seq().double().eval()}

def _theirs(cls, model, lf, data, params=None, **kw):
    ps = list(model.parameters()) if params is None else params
    op = cls(model, lf, ps, data, separate_weight_and_bias=False, check_deterministic=False, **kw)
    return op @ torch.eye(sum(p.numel() for p in ps), dtype=D)

def _close(a, b, tol=1e-6): assert (a - b).abs().max().item() <= tol * max(1., b.abs().max().item()), (a - b).abs().max().item()


@pytest.mark.parametrize('kind', ['mlp', 'cnn', 'seq'])
@pytest.mark.parametrize('approx', ['expand', 'reduce'])
@pytest.mark.parametrize('fisher', ['type-2', 'empirical'])
def test_matches_curvlinops(kind, approx, fisher):
    "K-FAC and EK-FAC equal curvlinops' KFACLinearOperator / EKFACLinearOperator (float64, dense), three unequal batches."
    model, data, lf = _MODELS[kind](), _data(kind), nn.CrossEntropyLoss()
    for ours, theirs in ((KFACOperator, curvlinops.KFACLinearOperator), (EKFACOperator, curvlinops.EKFACLinearOperator)):
        op = ours(model, lf, data, fisher_type=fisher, kfac_approx=approx)
        _close(op.to_dense(), _theirs(theirs, model, lf, data, fisher_type=fisher, kfac_approx=approx))

@pytest.mark.parametrize('lf', [nn.MSELoss(), nn.MSELoss(reduction='sum'), nn.BCEWithLogitsLoss(), nn.CrossEntropyLoss(reduction='sum')])
def test_losses_and_reductions_match_curvlinops(lf):
    model = _mlp()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(12, 6, generator=g, dtype=D)
    Y = torch.randint(0, 4, (12,), generator=g) if isinstance(lf, nn.CrossEntropyLoss) else (
        torch.randint(0, 2, (12, 4), generator=g).to(D) if isinstance(lf, nn.BCEWithLogitsLoss) else torch.randn(12, 4, generator=g, dtype=D))
    data = [(X[:7], Y[:7]), (X[7:], Y[7:])]
    for fisher in ('type-2', 'empirical'):
        for ours, theirs in ((KFACOperator, curvlinops.KFACLinearOperator), (EKFACOperator, curvlinops.EKFACLinearOperator)):
            _close(ours(model, lf, data, fisher_type=fisher).to_dense(), _theirs(theirs, model, lf, data, fisher_type=fisher))

def test_parameter_subsets_match_curvlinops():
    "A weight without its bias (no ones column) and a bias alone (A = 1): curvlinops' blocks for those parameters."
    model, data, lf = _cnn(), _data('cnn'), nn.CrossEntropyLoss()
    ps = [model[0].bias, model[2].weight, model[5].weight, model[5].bias]
    for ours, theirs in ((KFACOperator, curvlinops.KFACLinearOperator), (EKFACOperator, curvlinops.EKFACLinearOperator)):
        op = ours(model, lf, data, ps)
        assert op.names == ['0.bias', '2.weight', '5.weight', '5.bias']
        _close(op.to_dense(), _theirs(theirs, model, lf, data, ps, fisher_type='type-2'))

def test_dataloader_unequal_batches():
    "A torch DataLoader with batches 4, 4, 2 gives the one-batch matrix (sample-weighted), and curvlinops' on the same loader."
    model, lf = _mlp(), nn.CrossEntropyLoss()
    (X, Y), = _data('mlp', 10, (10,))
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=4)
    for cls in (KFACOperator, EKFACOperator):
        a = cls(model, lf, dl)
        assert a.num_samples == 10
        # K-FAC's G factor of a mean loss is a sample-weighted sum over the batches: the same as one batch of all 10
        _close(a.to_dense(), cls(model, lf, (X, Y)).to_dense(), 1e-12)
    _close(KFACOperator(model, lf, dl).to_dense(), _theirs(curvlinops.KFACLinearOperator, model, lf, dl, fisher_type='type-2'))


def _ggn_reference(model, lf, x, y):
    "Dense GGN Jᵀ H J of the loss on one batch, by torch.func (independent of fastsprkd)."
    from torch.func import functional_call, jacrev, hessian
    names = [n for n, _ in model.named_parameters()]
    theta = tuple(p.detach() for p in model.parameters())
    f = lambda *ps: functional_call(model, dict(zip(names, ps)), (x,))
    out = f(*theta)
    J = torch.cat([j.reshape(out.numel(), -1) for j in jacrev(f, argnums=tuple(range(len(theta))))(*theta)], 1)
    H = hessian(lambda o: lf(o, y))(out).reshape(out.numel(), out.numel())
    return J.T @ H @ J

@pytest.mark.parametrize('lf', [nn.CrossEntropyLoss(), nn.MSELoss()])
def test_single_linear_one_sample_is_exact(lf):
    "One Linear layer, one sample per batch: G ⊗ A is the layer's GGN exactly (and EK-FAC too), over two such batches."
    torch.manual_seed(5)
    lin = nn.Linear(5, 3).double()
    xs = [torch.randn(1, 5, dtype=D) for _ in range(2)]
    ys = [torch.tensor([2]), torch.tensor([0])] if isinstance(lf, nn.CrossEntropyLoss) else [torch.randn(1, 3, dtype=D) for _ in range(2)]
    ref = sum(_ggn_reference(lin, lf, x, y) for x, y in zip(xs, ys)) / 2
    one = [(xs[0], ys[0])]
    _close(KFACOperator(lin, lf, one).to_dense(), _ggn_reference(lin, lf, xs[0], ys[0]), 1e-12)
    _close(EKFACOperator(lin, lf, one).to_dense(), _ggn_reference(lin, lf, xs[0], ys[0]), 1e-12)
    _close(GGNOperator(lin, lf, list(zip(xs, ys))).to_dense(), ref, 1e-12)  # the reference itself agrees with core's GGN
    two = KFACOperator(lin, lf, list(zip(xs, ys))).to_dense()
    if isinstance(lf, nn.MSELoss): _close(two, ref, 1e-12)  # a constant output Hessian: G ⊗ A stays exact for any N
    else: assert (two - ref).abs().max() > 1e-4  # else the mean of Kronecker factors is not the mean of Kronecker products


@pytest.mark.parametrize('kind', ['mlp', 'cnn'])
def test_inverse_logdet_trace(kind):
    model, data, lf = _MODELS[kind](), _data(kind), nn.CrossEntropyLoss()
    for cls in (KFACOperator, EKFACOperator):
        op = cls(model, lf, data)
        M = op.to_dense()
        n, d = op.num_params, 1e-3
        I = torch.eye(n, dtype=D)
        inv = op.inverse(d)
        assert (inv.matmat(M + d * I) - I).abs().max() <= 1e-8
        assert (inv @ (M[:, 0] + d * I[:, 0]) - I[:, 0]).abs().max() <= 1e-8  # matvec, `@`
        _close(op.logdet(d), torch.logdet(M + d * I), 1e-10)
        _close(op.trace(), M.trace(), 1e-12)
        assert inv.num_params == n and inv.dtype == D and inv.names == op.names
    # the EK-FAC eigenvalues are the diagonal of the matrix in K-FAC's eigenbasis, not K-FAC's
    ek = EKFACOperator(model, lf, data)
    assert not torch.allclose(ek.to_dense(), KFACOperator(model, lf, data).to_dense())

def test_mc_seeded_and_in_expectation():
    "MC: the same seed gives the same factors, another seed others; many samples approach type-2's G."
    model, data, lf = _mlp(), _data('mlp', 12, (12,)), nn.CrossEntropyLoss()
    a = KFACOperator(model, lf, data, fisher_type='mc', seed=1).to_dense()
    assert torch.equal(a, KFACOperator(model, lf, data, fisher_type='mc', seed=1).to_dense())
    assert not torch.allclose(a, KFACOperator(model, lf, data, fisher_type='mc', seed=2).to_dense())
    t2 = KFACOperator(model, lf, data).to_dense()
    many = KFACOperator(model, lf, data, fisher_type='mc', mc_samples=400).to_dense()
    assert (many - t2).norm() / t2.norm() < 0.1
    assert (a - t2).norm() / t2.norm() > (many - t2).norm() / t2.norm()
    ek = EKFACOperator(model, lf, data, fisher_type='mc', seed=1)
    assert torch.equal(ek.to_dense(), EKFACOperator(model, lf, data, fisher_type='mc', seed=1).to_dense())


class _NormNet(nn.Module):
    "Conv–BatchNorm–ReLU–Linear–LayerNorm–Linear: BatchNorm and LayerNorm parameters take the fallback."
    def __init__(self):
        super().__init__(); torch.manual_seed(6)
        self.conv, self.bn, self.fc1, self.ln, self.fc2 = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(48, 5), nn.LayerNorm(5), nn.Linear(5, 3)
        self.bn.running_mean.uniform_(-.5, .5); self.bn.running_var.uniform_(.5, 2)
        nn.init.uniform_(self.bn.weight, .5, 1.5); nn.init.uniform_(self.ln.weight, .5, 1.5)
    def forward(self, x): return self.fc2(self.ln(self.fc1(torch.relu(self.bn(self.conv(x))).flatten(1))))

def test_fallback_block():
    "BatchNorm/LayerNorm parameters: 'diagonal' is the exact GGN diagonal of them, 'exact' their GGN block, 'error' refuses."
    model, lf = _NormNet().double().eval(), nn.CrossEntropyLoss()
    data = _data('cnn', 20, (12, 8))
    fb = ['bn.weight', 'bn.bias', 'ln.weight', 'ln.bias']
    G = GGNOperator(model, lf, data, fb).to_dense()
    op = KFACOperator(model, lf, data)
    rows = torch.cat([torch.arange(s.start, s.stop) for n, s in zip(op.names, op._sl) if n in fb])
    M = op.to_dense()
    _close(M[rows][:, rows], torch.diag(G.diagonal()), 1e-10)
    other = torch.ones(op.num_params, dtype=torch.bool); other[rows] = False
    assert M[rows][:, other].abs().max() == 0  # block-diagonal: no coupling to the Kronecker blocks
    assert "fallback='diagonal' for 16 parameters in 4 tensors" in repr(op)
    ex = KFACOperator(model, lf, data, fallback='exact').to_dense()
    _close(ex[rows][:, rows], G, 1e-10)
    _close(ex[other][:, other], M[other][:, other], 0)  # the Kronecker blocks do not depend on the fallback
    ek = EKFACOperator(model, lf, data, fallback='exact')
    _close(ek.to_dense()[rows][:, rows], G, 1e-10)
    n, d = ek.num_params, 1e-3
    assert (ek.inverse(d).matmat(ek.to_dense() + d * torch.eye(n, dtype=D)) - torch.eye(n, dtype=D)).abs().max() <= 1e-8
    _close(ek.logdet(d), torch.logdet(ek.to_dense() + d * torch.eye(n, dtype=D)), 1e-10)
    # empirical: the EF's diagonal (cross-entropy: curvlinops' and EFOperator's scalings agree)
    E = EFOperator(model, lf, data, fb).to_dense()
    _close(KFACOperator(model, lf, data, fisher_type='empirical').to_dense()[rows][:, rows], torch.diag(E.diagonal()), 1e-10)
    with pytest.raises(ValueError, match="fallback='error'.*bn.weight"): KFACOperator(model, lf, data, fallback='error')
    # only the Kronecker part selected: no fallback
    assert KFACOperator(model, lf, data, ['conv', 'fc1', 'fc2'], fallback='error').num_params == op.num_params - 16


def test_save_load_round_trip(tmp_path):
    model, lf = _NormNet().double().eval(), nn.CrossEntropyLoss()
    data = _data('cnn', 12, (12,))
    for cls, kw in ((KFACOperator, {}), (EKFACOperator, {'fallback': 'exact', 'kfac_approx': 'reduce'})):
        op = cls(model, lf, data, **kw)
        p = tmp_path / f'{cls.__name__}.safetensors'
        assert op.save(p) == str(p)
        assert os.listdir(tmp_path).count(p.name) == 1 and not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
        back = cls.load(p, model, lf)
        assert torch.equal(back.to_dense(), op.to_dense())
        assert torch.equal(back.inverse(1e-2).to_dense(), op.inverse(1e-2).to_dense())
        assert back.names == op.names and back.num_samples == op.num_samples and repr(back) == repr(op)
        with open(p, 'rb') as f: assert b'pickle' not in f.read(200)
    with pytest.raises(ValueError, match='holds a KFACOperator'): EKFACOperator.load(tmp_path / 'KFACOperator.safetensors', model)
    with pytest.raises(FileNotFoundError, match='no K-FAC file'): KFACOperator.load(tmp_path / 'missing.safetensors', model)
    with pytest.raises(ValueError, match='no parameter'): KFACOperator.load(tmp_path / 'KFACOperator.safetensors', _mlp())
    other = _NormNet().double(); other.fc1 = nn.Linear(48, 6).double(); other.ln = nn.LayerNorm(6).double(); other.fc2 = nn.Linear(6, 3).double()
    with pytest.raises(ValueError, match='shapes differ'): KFACOperator.load(tmp_path / 'KFACOperator.safetensors', other)
    with pytest.raises(ValueError, match='fitted with'): KFACOperator.load(tmp_path / 'KFACOperator.safetensors', model, nn.MSELoss())
    from safetensors.torch import save_file
    save_file({'x': torch.zeros(2)}, str(tmp_path / 'plain.safetensors'))
    with pytest.raises(ValueError, match='not one written by'): KFACOperator.load(tmp_path / 'plain.safetensors', model)
    (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(ValueError, match='not a readable safetensors'): KFACOperator.load(tmp_path / 'junk.safetensors', model)
    with pytest.raises(FileNotFoundError, match='does not exist'): op.save(tmp_path / 'no' / 'dir.safetensors')


def test_model_state_and_inplace_activations():
    "The model is left as it was (train mode, requires_grad, .grad); ReLU(inplace=True) after a layer gives the same factors."
    torch.manual_seed(7)
    m1 = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    m2 = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 4)).double()
    m2.load_state_dict(m1.state_dict())
    m2[0].weight.grad = torch.ones_like(m2[0].weight)
    m2[2].bias.requires_grad_(False)
    data, lf = _data('mlp', 10, (10,)), nn.CrossEntropyLoss()
    before = {n: p.detach().clone() for n, p in m2.named_parameters()}
    ps = list(m2.parameters())
    for cls in (KFACOperator, EKFACOperator):
        a = cls(m1, lf, data, list(m1.parameters())).to_dense()
        _close(cls(m2, lf, data, ps).to_dense(), a, 1e-14)
    assert m2.training and not m2[2].bias.requires_grad and m2[0].weight.requires_grad
    # an in-place op on a later layer's output (one that requires grad): detected, that layer cloned, the forward rerun once
    m3 = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    m4 = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.ReLU(inplace=True), nn.Linear(5, 4)).double()
    m4.load_state_dict(m3.state_dict())
    two = _data('mlp', 10, (6, 4))
    for cls in (KFACOperator, EKFACOperator):
        _close(cls(m4, lf, two).to_dense(), cls(m3, lf, two).to_dense(), 1e-14)
    _close(KFACOperator(m4, lf, two).to_dense(), _theirs(curvlinops.KFACLinearOperator, m3, lf, two, fisher_type='type-2'))
    assert KFACOperator(m4, lf, two, progress=True).num_samples == 10
    assert torch.equal(m2[0].weight.grad, torch.ones_like(m2[0].weight)) and m2[2].weight.grad is None
    assert all(torch.equal(p, before[n]) for n, p in m2.named_parameters())

def test_output_fn_and_influence_call():
    "The call influence makes: EKFACOperator(model, loss, data, params, eval_mode=, n_inp=, output_fn=).inverse(d).matmat(V)."
    class Tup(nn.Module):
        def __init__(self): super().__init__(); self.net = _mlp()
        def forward(self, x): return self.net(x), x
    m, data, lf = Tup(), _data('mlp', 10, (10,)), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match='output_fn='): KFACOperator(m, lf, data)
    op = EKFACOperator(m, lf, data, ['net.2.weight', 'net.2.bias'], eval_mode=True, n_inp=1, output_fn=lambda out: out[0])
    ref = EKFACOperator(m.net, lf, data, [m.net[2].weight, m.net[2].bias])
    V = torch.randn(op.num_params, 3, dtype=D)
    _close(op.inverse(0.1).matmat(V), ref.inverse(0.1).matmat(V), 1e-14)
    assert op.inverse(0.1).num_matvecs == 0 and op.num_params == 24


def test_bad_input():
    model, data, lf = _mlp(), _data('mlp', 8, (8,)), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match='likelihood'): KFACOperator(model, nn.L1Loss(), data)
    with pytest.raises(ValueError, match='label smoothing'): KFACOperator(model, nn.CrossEntropyLoss(label_smoothing=.1), data)
    with pytest.raises(ValueError, match='fisher_type'): KFACOperator(model, lf, data, fisher_type='type2')
    with pytest.raises(ValueError, match='kfac_approx'): KFACOperator(model, lf, data, kfac_approx='mean')
    with pytest.raises(ValueError, match="only for fisher_type='mc'"): KFACOperator(model, lf, data, mc_samples=3)
    with pytest.raises(ValueError, match='fallback must'): KFACOperator(model, lf, data, fallback='drop')
    with pytest.raises(ValueError, match='data is empty'): KFACOperator(model, lf, [(data[0][0][:0], data[0][1][:0])])
    with pytest.raises(ValueError, match='damping'): KFACOperator(model, lf, data).inverse(-1.)
    with pytest.raises(ValueError, match='no inverse'): KFACOperator(model, lf, data).inverse(0.)  # CE: G is singular
    g = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 3)).double()
    with pytest.raises(ValueError, match='groups=2'): KFACOperator(g, lf, _data('cnn', 4, (4,)))
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double(); tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match='shared by 2 modules'): KFACOperator(tied, lf, [(torch.randn(3, 4, dtype=D), torch.tensor([0, 1, 2]))])
    class Twice(nn.Module):
        def __init__(self): super().__init__(); self.l = nn.Linear(4, 4)
        def forward(self, x): return self.l(torch.tanh(self.l(x)))
    with pytest.raises(ValueError, match='more than once'): KFACOperator(Twice().double(), lf, [(torch.randn(3, 4, dtype=D), torch.tensor([0, 1, 2]))])
    emb = nn.Sequential(nn.Embedding(10, 6), nn.Flatten(), nn.Linear(12, 3)).double()
    xe, ye = torch.randint(0, 10, (5, 2)), torch.randint(0, 3, (5,))
    assert "fallback='diagonal' for 60 parameters" in repr(KFACOperator(emb, lf, (xe, ye)))
    with pytest.raises(ValueError, match="fallback='exact' builds a dense"):
        KFACOperator(nn.Sequential(nn.Embedding(5000, 1), nn.Flatten(), nn.Linear(2, 3)).double(), lf, (xe, ye), fallback='exact')
    with pytest.raises(ValueError, match='ignore_index'):
        KFACOperator(model, lf, [(data[0][0], torch.full((8,), -100))], fisher_type='empirical')


def test_kfac_preconditioned_cg():
    """solve(..., preconditioner=K-FAC/EK-FAC inverse) on a CNN's GGN whose layers differ in curvature scale (the first conv
    ×10): the same x in fewer CG iterations; only GGN products counted. (On this CNN unscaled, with a GGN null space that plain
    CG sees as one eigenvalue, the preconditioned solve takes more iterations: 79 vs 76 at N = 200; see 06_kfac.)"""
    from fastsprkd.estimators import solve
    model, data, lf = _cnn(), _data('cnn', 200, (100, 100)), nn.CrossEntropyLoss()
    with torch.no_grad(): model[0].weight.mul_(10); model[0].bias.mul_(10)
    G = GGNOperator(model, lf, data)
    b = torch.randn(G.num_params, generator=torch.Generator().manual_seed(8), dtype=D)
    d = 1e-3
    plain = solve(G, b, damping=d, tol=1e-8)
    ref = torch.linalg.solve(G.to_dense() + d * torch.eye(G.num_params, dtype=D), b)
    assert plain.converged and (plain.x - ref).norm() / ref.norm() < 1e-6
    for cls in (KFACOperator, EKFACOperator):
        P = cls(model, lf, data).inverse(d)
        pre = solve(G, b, damping=d, tol=1e-8, preconditioner=P)
        assert pre.converged and pre.iterations < plain.iterations / 2, (pre.iterations, plain.iterations)
        assert (pre.x - ref).norm() / ref.norm() < 1e-6
        assert pre.num_matvecs == pre.iterations + 1 and P.num_matvecs == pre.iterations + 1  # the final true residual is one more product


def test_eigh_falls_back_to_scipy(monkeypatch):
    "torch's eigh failing to converge (LAPACK syevd on a rank-deficient factor) is retried with scipy's drivers: same operator."
    model, data, lf = _mlp(), _data('mlp', 12, (12,)), nn.CrossEntropyLoss()
    ref = EKFACOperator(model, lf, data)
    real = torch.linalg.eigh
    calls = []
    def failing(M, *a, **k):
        calls.append(M.shape)
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")
    monkeypatch.setattr(torch.linalg, 'eigh', failing)
    ek = EKFACOperator(model, lf, data)
    monkeypatch.setattr(torch.linalg, 'eigh', real)
    assert calls
    _close(ek.to_dense(), ref.to_dense(), 1e-12)
    n, d = ek.num_params, 1e-3
    assert (ek.inverse(d).matmat(ek.to_dense() + d * torch.eye(n, dtype=D)) - torch.eye(n, dtype=D)).abs().max() <= 1e-8


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu():
    "On a GPU: the same K-FAC/EK-FAC (with the fallback block, and seeded MC labels drawn on the CPU) as on the CPU."
    model, lf = _NormNet().double().eval(), nn.CrossEntropyLoss()
    data = _data('cnn', 20, (12, 8))
    gpu = [(x.cuda(), y.cuda()) for x, y in data]
    for cls in (KFACOperator, EKFACOperator):
        for kw in ({}, {'fisher_type': 'mc', 'seed': 3}):
            a = cls(model, lf, data, **kw).to_dense()
            b = cls(model.cuda(), lf, gpu, **kw)
            assert b.device.type == 'cuda'
            _close(b.to_dense().cpu(), a, 1e-10)
            n = b.num_params
            assert (b.inverse(1e-3).matmat(b.to_dense() + 1e-3 * torch.eye(n, dtype=D, device='cuda')) - torch.eye(n, dtype=D, device='cuda')).abs().max() <= 1e-8
            model.cpu()


@pytest.mark.parametrize('cls', [KFACOperator, EKFACOperator])
def test_basin_volume_of_kfac_from_its_eigenvalues(cls):
    "basin_volume(K-FAC/EK-FAC operator) takes their exact eigenvalues: equal to the dense matrix's basin volume, with no products."
    from fastsprkd.analysis import basin_volume
    model, data = _cnn(), _data('cnn')
    op = cls(model, nn.CrossEntropyLoss(), data)
    dense = op.matmat(torch.eye(op.num_params, dtype=D))
    got, want = basin_volume(op, shift=0.1), basin_volume((dense + dense.T) / 2, shift=0.1)
    assert got.log_volume == pytest.approx(want.log_volume, rel=1e-10, abs=1e-8)
    assert got.num_matvecs == 0


def test_exact_logdet_of_kfac_from_its_eigenvalues():
    "estimators.logdet(K-FAC operator, method='exact') takes its eigenvalues (no products) and equals its own logdet."
    from fastsprkd.estimators import logdet
    op = KFACOperator(_mlp(), nn.CrossEntropyLoss(), _data('mlp'))
    got = logdet(op, shift=0.1)
    assert got.num_matvecs == 0
    assert got.estimate == pytest.approx(op.logdet(0.1).item(), rel=1e-12)
