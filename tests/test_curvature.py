"GGN, empirical Fisher and Monte-Carlo Fisher operators vs dense float64 references built independently with torch.func."
import math, pytest, torch, warnings
from torch import nn
from torch.func import functional_call, jacrev, hessian, grad
from fastsprkd.core import GGNOperator, EFOperator, FisherMCOperator, HessianOperator, curvature_operator

@pytest.fixture(autouse=True)
def _float64():
    "float64 by default inside this module's tests only (restored after each: other test files run in the same process)."
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

def _mlp(seed=0, d=4, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, c)).double()

def _cnn(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    with torch.no_grad():  # non-trivial running statistics, used in eval mode
        m[1].running_mean.uniform_(-.5, .5); m[1].running_var.uniform_(.5, 2.)
    return m.train()  # the operators evaluate in eval mode (eval_mode=True) and restore train mode

def _flat_fns(model, names):
    "Output and per-sample loss as functions of the flat vector of the parameters `names` (the others and buffers fixed)."
    named = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    fixed.update(dict(model.named_buffers()))
    shapes = [named[n].shape for n in names]
    sizes = [s.numel() for s in shapes]
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    def out(th, x):
        ps = {n: c.reshape(s) for n, c, s in zip(names, th.split(sizes), shapes)}
        was = model.training; model.eval()
        try: return functional_call(model, {**fixed, **ps}, (x,))
        finally: model.train(was)
    return theta, out

def _dense_ggn(model, lf, batches, names):
    theta, out = _flat_fns(model, names)
    N = sum(len(x) for x, _ in batches)
    G = 0
    for x, y in batches:
        J = jacrev(out)(theta, x)                      # (*out, n)
        f = out(theta, x).detach()
        H = hessian(lambda o: lf(o, y))(f)             # (*out, *out)
        k = f.numel()
        J, H = J.reshape(k, -1), H.reshape(k, k)
        G = G + len(x) / N * (J.T @ H @ J)
    return G

def _dense_ef(model, lf, batches, names, reduction='mean'):
    theta, out = _flat_fns(model, names)
    N = sum(len(x) for x, _ in batches)
    E = 0
    for x, y in batches:
        B = len(x)
        for i in range(B):  # a plain loop over the samples: no vmap in the reference
            g = grad(lambda th: lf(out(th, x[i:i+1]), y[i:i+1]))(theta)
            E = E + (B / N) * (1 / B if reduction == 'mean' else 1.) * torch.outer(g, g)
    return E

def _names(model, params=None):
    if params is None: return [n for n, _ in model.named_parameters()]
    ids = {id(p) for p in params.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]

def _data(n=12, d=4, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)

def test_mlp_ggn_ef():
    m, (x, y), lf = _mlp(), _data(), nn.CrossEntropyLoss()
    G, E = GGNOperator(m, lf, (x, y)).to_dense(), EFOperator(m, lf, (x, y)).to_dense()
    assert (G - _dense_ggn(m, lf, [(x, y)], _names(m))).abs().max() <= 1e-10
    assert (E - _dense_ef(m, lf, [(x, y)], _names(m))).abs().max() <= 1e-10

def test_cnn_batchnorm_eval():
    m, lf = _cnn(), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 1, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    G, E = GGNOperator(m, lf, (x, y)).to_dense(), EFOperator(m, lf, (x, y)).to_dense()
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # state left as it was
    assert (G - _dense_ggn(m, lf, [(x, y)], _names(m))).abs().max() <= 1e-10
    assert (E - _dense_ef(m, lf, [(x, y)], _names(m))).abs().max() <= 1e-10

def test_dataloader_unequal_batches_mse():
    torch.manual_seed(3)
    m, lf = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(), nn.MSELoss()
    x, y = torch.randn(17, 3), torch.randn(17, 2)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)  # 7, 7, 3
    batches = [(x[i:i+7], y[i:i+7]) for i in range(0, 17, 7)]
    ggn, ef = GGNOperator(m, lf, dl), EFOperator(m, lf, dl)
    assert ggn.num_samples == 17
    assert (ggn.to_dense() - _dense_ggn(m, lf, batches, _names(m))).abs().max() <= 1e-10
    assert (ef.to_dense() - _dense_ef(m, lf, batches, _names(m))).abs().max() <= 1e-10
    v = torch.randn(ggn.num_params)
    torch.testing.assert_close(ggn @ v, ggn.to_dense() @ v, rtol=1e-10, atol=1e-12)
    assert ggn.num_matvecs == 1 + 2 * ggn.num_params

def test_parameter_subset():
    m, (x, y), lf = _mlp(), _data(), nn.CrossEntropyLoss()
    ggn, ef = GGNOperator(m, lf, (x, y), params=m[2]), EFOperator(m, lf, (x, y), params=m[2])
    assert ggn.num_params == 5 * 3 + 3
    assert (ggn.to_dense() - _dense_ggn(m, lf, [(x, y)], _names(m, m[2]))).abs().max() <= 1e-10
    assert (ef.to_dense() - _dense_ef(m, lf, [(x, y)], _names(m, m[2]))).abs().max() <= 1e-10

def test_losses_fastai_sum_and_autograd():
    from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat, MSELossFlat
    m, (x, y) = _mlp(), _data()
    yf = torch.rand(12, 3)
    # fastai's flattened losses: the reference is the torch loss they wrap (equal values; fastai's TensorBase is not used there)
    for lf, ref_lf, t in ((CrossEntropyLossFlat(), nn.CrossEntropyLoss(), y), (BCEWithLogitsLossFlat(), nn.BCEWithLogitsLoss(), (yf > .5).double()),
                          (MSELossFlat(), nn.MSELoss(), yf)):
        ref = _dense_ggn(m, ref_lf, [(x, t)], _names(m))
        assert (GGNOperator(m, lf, (x, t)).to_dense() - ref).abs().max() <= 1e-10, type(lf).__name__
    torch.manual_seed(6)
    seq = nn.Conv1d(2, 3, 1).double()  # (B, C, T) logits, classes on axis 1: fastai transposes and flattens them
    xs, ys = torch.randn(4, 2, 5), torch.randint(0, 3, (4, 5))
    ref = _dense_ggn(seq, nn.CrossEntropyLoss(), [(xs, ys)], _names(seq))
    assert (GGNOperator(seq, CrossEntropyLossFlat(axis=1), (xs, ys)).to_dense() - ref).abs().max() <= 1e-10
    cases = [
             (nn.CrossEntropyLoss(reduction='sum'), y), (nn.BCEWithLogitsLoss(reduction='sum'), yf),
             (nn.HuberLoss(delta=.3), yf),  # no known likelihood: the output Hessian by autograd
             (nn.CrossEntropyLoss(), torch.softmax(yf, 1))]  # soft targets: autograd
    for lf, t in cases:
        ref = _dense_ggn(m, lf, [(x, t)], _names(m))
        assert (GGNOperator(m, lf, (x, t)).to_dense() - ref).abs().max() <= 1e-10, type(lf).__name__
    lf = nn.CrossEntropyLoss(reduction='sum')
    E = EFOperator(m, lf, (x, y)).to_dense()
    assert (E - _dense_ef(m, lf, [(x, y)], _names(m), reduction='sum')).abs().max() <= 1e-10

def test_ce_ignore_index_sequence():
    "Cross-entropy over positions (B, C, T) with ignored targets: the mean over the counted positions."
    torch.manual_seed(4)
    m = nn.Sequential(nn.Conv1d(2, 3, 1)).double()
    x, y = torch.randn(4, 2, 5), torch.randint(0, 3, (4, 5))
    y[0, :2] = -100
    lf = nn.CrossEntropyLoss()
    assert (GGNOperator(m, lf, (x, y)).to_dense() - _dense_ggn(m, lf, [(x, y)], _names(m))).abs().max() <= 1e-10

def test_ggn_is_hessian_for_linear_model_and_psd():
    torch.manual_seed(5)
    m, (x, y), lf = nn.Linear(4, 3).double(), _data(), nn.CrossEntropyLoss()
    G, H = GGNOperator(m, lf, (x, y)).to_dense(), HessianOperator(m, lf, (x, y)).to_dense()
    assert (G - H).abs().max() <= 1e-10
    m2 = _mlp()
    for M in (GGNOperator(m2, lf, (x, y)).to_dense(), EFOperator(m2, lf, (x, y)).to_dense()):
        ev = torch.linalg.eigvalsh(M)
        assert ev.min() >= -1e-10 * ev.max()
    assert torch.linalg.eigvalsh(HessianOperator(m2, lf, (x, y)).to_dense()).min() < 0  # the Hessian is not PSD here

def test_mc_fisher_expectation():
    "Mean over independent seeds equals the GGN within 4 standard errors (Frobenius norm); one seed is reproducible."
    m, (x, y) = _mlp(), _data(n=8)
    for lf, t in ((nn.CrossEntropyLoss(), y), (nn.MSELoss(), torch.randn(8, 3)), (nn.BCEWithLogitsLoss(), torch.rand(8, 3))):
        G = GGNOperator(m, lf, (x, t)).to_dense()
        Fs = torch.stack([FisherMCOperator(m, lf, (x, t), mc_samples=20, seed=s).to_dense() for s in range(30)])
        mean, se2 = Fs.mean(0), Fs.var(0).sum() / len(Fs)
        assert (mean - G).norm() <= 4 * se2.sqrt(), type(lf).__name__
        assert (mean - G).norm() > 1e-10 * G.norm()  # samples, not the GGN itself
    f1 = FisherMCOperator(m, lf, (x, t), mc_samples=3, seed=7)
    v = torch.randn(f1.num_params)
    assert torch.equal(f1 @ v, f1 @ v) and torch.equal(f1 @ v, FisherMCOperator(m, lf, (x, t), mc_samples=3, seed=7) @ v)
    with pytest.raises(ValueError, match='likelihood'): FisherMCOperator(m, nn.HuberLoss(), (x, t))

def test_curvlinops_agree():
    curvlinops = pytest.importorskip('curvlinops')
    m, (x, y), lf = _mlp(), _data(n=10), nn.CrossEntropyLoss()
    data = [(x[:6], y[:6]), (x[6:], y[6:])]  # unequal batches: curvlinops normalizes by the total number of samples too
    ps = list(m.parameters())
    n = sum(p.numel() for p in ps)
    I = torch.eye(n)
    for ours, theirs in ((GGNOperator, curvlinops.GGNLinearOperator), (EFOperator, curvlinops.EFLinearOperator)):
        A = ours(m, lf, data).to_dense()
        B = theirs(m, lf, ps, data, check_deterministic=False) @ I
        assert (A - B).abs().max() <= 1e-10, ours.__name__

def test_curvature_operator_by_name():
    m, (x, y), lf = _mlp(), _data(), nn.CrossEntropyLoss()
    assert isinstance(curvature_operator('ggn', m, lf, (x, y), mode='rev'), GGNOperator)
    assert isinstance(curvature_operator('hessian', m, lf, (x, y), mode='rev'), HessianOperator)
    with pytest.raises(ValueError, match="curvature must be one of"): curvature_operator('gnn', m, lf, (x, y))

class _Sq(torch.autograd.Function):
    "x² with a backward only (no forward-mode derivative): the GGN falls back on J·v as a vjp of a vjp."
    generate_vmap_rule = True
    @staticmethod
    def forward(x): return x * x
    @staticmethod
    def setup_context(ctx, inputs, output): ctx.save_for_backward(inputs[0])
    @staticmethod
    def backward(ctx, g): return 2 * ctx.saved_tensors[0] * g

class _SqNet(nn.Module):
    def __init__(self): super().__init__(); self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 3)
    def forward(self, x): return self.b(_Sq.apply(self.a(x)))

def test_no_forward_mode():
    torch.manual_seed(7)
    m, (x, y), lf = _SqNet().double(), _data(), nn.CrossEntropyLoss()
    op = GGNOperator(m, lf, (x, y))
    assert (op.to_dense() - _dense_ggn(m, lf, [(x, y)], _names(m))).abs().max() <= 1e-10
    assert not op._jvp_ok

# ---------------------------------------------------------------- curvature= where an operator is built for the user
@pytest.mark.filterwarnings('ignore:HessianSpectrumCallback')
def test_observer_ggn_bit_identical_and_psd():
    import numpy as np
    from test_observe import train, OPTS, CHEAP
    torch.set_default_dtype(torch.float32)  # the digits network of test_observe is float32
    from fastsprkd.callback.observe import HessianSpectrumCallback, SharpnessCallback
    ref, losses, rng = train(OPTS['adam'], [])
    spec = HessianSpectrumCallback(every=3, n_probe=32, k=2, trace=False, curvature='ggn', precond=False, **CHEAP)
    sharp = SharpnessCallback(curvature='ggn')
    built, new = [], spec.new_operator
    spec.new_operator = lambda *a, **k: built.append(new(*a, **k)) or built[-1]
    got, losses2, rng2 = train(OPTS['adam'], [spec, sharp])
    for k in ref: assert torch.equal(ref[k], got[k]), k
    assert [float(l) for l in losses] == [float(l) for l in losses2]
    assert torch.equal(rng[0], rng2[0]) and rng[1] == rng2[1] and np.array_equal(rng[2], rng2[2])
    assert built and all(type(o) is GGNOperator for o in built) and len(spec.history) >= 2
    for r in spec.history:  # a PSD matrix: λ_min ≥ 0 up to the eigen-solver's tolerance (tol·‖G‖)
        assert r['lambda_min'] >= -2e-2 * r['lambda_max'], r
    assert all(r['dir_sharpness'] >= -1e-6 for r in sharp.history)

def test_saddle_callbacks_refuse_psd_matrices():
    from fastsprkd.callback.sprkd import SaddleCaptureCallback, SaddleRecruitCallback
    for c in ('ggn', 'ef', 'fisher'):
        with pytest.raises(ValueError, match='negative'): SaddleCaptureCallback(curvature=c)
        with pytest.raises(ValueError, match='negative'): SaddleRecruitCallback('nowhere', curvature=c)
    assert SaddleCaptureCallback().matrix == 'hessian'
    from fastsprkd.callback.observe import HessianSpectrumCallback
    with pytest.raises(ValueError, match='curvature must be one of'): HessianSpectrumCallback(curvature='gauss-newton')

def test_influence_and_landscape_ggn():
    from fastsprkd.analysis import influence, loss_landscape, per_sample_gradients
    m, (x, y), lf = _mlp(), _data(), nn.CrossEntropyLoss()
    xt, yt = _data(n=3, seed=9)
    names = _names(m)
    G = _dense_ggn(m, lf, [(x, y)], names)
    d = 1e-3
    Gtr, Gte = per_sample_gradients(m, lf, (x, y), names), per_sample_gradients(m, lf, (xt, yt), names)
    want = -Gtr @ torch.linalg.solve(G + d * torch.eye(len(G)), Gte.T)
    for method in ('exact', 'cg'):
        got = influence(m, lf, (x, y), (xt, yt), damping=d, method=method, curvature='ggn', tol=1e-12, max_iter=500).scores
        assert (got - want).abs().max() <= 1e-7 * want.abs().max(), method
    ls = loss_landscape(m, lf, (x, y), 'top_eigenvector', alphas=torch.tensor([0.]), curvature='ggn')
    top = torch.linalg.eigh(G).eigenvectors[:, -1]
    assert abs(float(ls.directions[0] @ top)) / float(ls.directions[0].norm()) > 1 - 1e-6

def test_ggn_kept_graph_follows_the_model():
    "Single-batch data keeps the output's graph between products; a parameter update (p.data, as fastai's optimizers) is seen."
    m, (x, y), lf = _mlp(), _data(), nn.CrossEntropyLoss()
    op = GGNOperator(m, lf, (x, y))
    v = torch.randn(op.num_params)
    a = op @ v
    assert op._graph is not None and torch.equal(op @ v, a)
    m[0].weight.data += 0.1
    b = op @ v
    assert torch.equal(b, GGNOperator(m, lf, (x, y), cache_graph=False) @ v) and not torch.equal(a, b)

def test_tuple_output_needs_output_fn():
    class Two(nn.Module):
        def __init__(self): super().__init__(); self.l = nn.Linear(4, 3)
        def forward(self, x): return self.l(x), x
    m, (x, y), lf = Two().double(), _data(), nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match='output_fn'): GGNOperator(m, lf, (x, y))
    G = GGNOperator(m, lf, (x, y), output_fn=lambda o: o[0]).to_dense()
    H = HessianOperator(m, lf, (x, y), output_fn=lambda o: o[0]).to_dense()
    assert (G - H).abs().max() <= 1e-10  # a linear model: GGN = Hessian


def test_broadcasting_mse_target_is_not_taken_as_analytic():
    "An MSE target of shape (B,) against a (B, 1) output broadcasts: the GGN must still be exact (= Hessian of a linear model); MC Fisher refuses."
    torch.manual_seed(0)
    lin = nn.Linear(3, 1).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch's own "target size differs" warning
        for red in ('mean', 'sum'):
            lf = nn.MSELoss(reduction=red)
            torch.testing.assert_close(GGNOperator(lin, lf, (x, y)).to_dense(), HessianOperator(lin, lf, (x, y)).to_dense(), rtol=1e-10, atol=1e-12)
            with pytest.raises(ValueError, match="differs from the output"): FisherMCOperator(lin, lf, (x, y)).matvec(torch.ones(4, dtype=torch.float64))


def test_ef_refuses_weighted_or_ignored_means():
    "A weighted or ignore_index mean is not a mean over samples: EF refuses it clearly; reduction='sum' works."
    torch.manual_seed(0)
    m = nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    v = torch.ones(15, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight"): EFOperator(m, nn.CrossEntropyLoss(weight=torch.tensor([1., 100., 1.], dtype=torch.float64)), (x, y)).matvec(v)
    yi = y.clone(); yi[:4] = -100
    with pytest.raises(ValueError, match="ignore_index"): EFOperator(m, nn.CrossEntropyLoss(), (x, yi)).matvec(v)
    EFOperator(m, nn.CrossEntropyLoss(), (x, y)).matvec(v)  # no ignored target: fine
    w = torch.tensor([1., 100., 1.], dtype=torch.float64)
    E = EFOperator(m, nn.CrossEntropyLoss(weight=w, reduction='sum'), (x, y)).to_dense()
    names = [n for n, _ in m.named_parameters()]
    def g(i):
        ps = [p.detach().requires_grad_() for p in m.parameters()]
        l = nn.CrossEntropyLoss(weight=w, reduction='sum')(torch.func.functional_call(m, dict(zip(names, ps)), (x[i:i+1],)), y[i:i+1])
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(l, ps)])
    G = torch.stack([g(i) for i in range(8)])
    torch.testing.assert_close(E, G.T @ G, rtol=1e-10, atol=1e-12)

def test_ggn_linearized_jacobian_products_match_forward_mode():
    """After `linearize_after` calls on a first kept graph, the GGN's J·V runs a `torch.func.linearize` trace: the same
    products as forward mode (float64, ≤ 1e-12 relative) and as the dense reference, checked once against forward mode;
    a parameter update drops the trace with the graph; a model the trace cannot take keeps forward mode."""
    m, lf = _cnn(), nn.CrossEntropyLoss()
    torch.manual_seed(1)
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 3, (6,))
    op, ref = GGNOperator(m, lf, (x, y)), GGNOperator(m, lf, (x, y))
    ref.linearize_after = 10**9  # forward mode on every call
    op.linearize_speedup = math.inf  # kept however fast (on this tiny network the trace's Python may not beat forward mode)
    V = torch.randn(op.num_params, 3)
    G = _dense_ggn(m, lf, [(x, y)], [n for n, _ in m.named_parameters()])
    for i in range(op.linearize_after + 3):
        a, b = op @ V, ref @ V
        assert (a - b).abs().max() <= 1e-12 * b.abs().max(), i
    assert op._lin is not None and op._lin[4] is not None and op._lin[5] == 2  # built, checked, in use
    assert op._lin_cost > 0
    assert (op @ V - G @ V).abs().max() <= 1e-10 * (G @ V).abs().max()
    m[0].weight.data += 0.1  # as fastai's optimizers: the key changes, the graph and its trace are rebuilt
    assert (op @ V - GGNOperator(m, lf, (x, y), cache_graph=False) @ V).abs().max() <= 1e-12 * (ref @ V).abs().max()
    assert op._lin is None or op._lin[4] is None
    op._lin_cost = float('inf')  # after a first trace: rebuilt only once forward mode has spent what it cost
    for _ in range(op.linearize_after + 3): op @ V
    assert op._lin[4] is None
    def untraceable(*a, **k): raise RuntimeError("cannot trace")
    import fastsprkd.curvature.ggn as ggn_mod
    old, ggn_mod.linearize = ggn_mod.linearize, untraceable
    try:
        bad = GGNOperator(m, lf, (x, y))
        for _ in range(bad.linearize_after + 3): c = bad @ V
        assert not bad._lin_ok and torch.equal(c, ref @ V)
    finally: ggn_mod.linearize = old
    slow = GGNOperator(m, lf, (x, y)); slow.linearize_speedup = 0.  # a trace that is not faster: dropped, for good
    for _ in range(slow.linearize_after + 3): c = slow @ V
    assert not slow._lin_ok and slow._lin is None and torch.equal(c, ref @ V)


def test_ef_on_a_model_vmap_cannot_batch():
    """fastai's AWD-LSTM classifier counts each batch's padding (data-dependent control flow that vmap refuses): the EF's
    per-sample gradients loop over the samples instead, and EF·v equals (1/B)·Σᵢ gᵢ(gᵢᵀv) from torch.func.grad per sample."""
    import sys, os, warnings
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_families_fit import text_dls, text_learner
    dls = text_dls()
    torch.manual_seed(0)
    model = text_learner(dls).model.eval()
    xb, yb = [o.as_subclass(torch.Tensor) for o in next(iter(dls.train.new(shuffle=False)))]
    lf = nn.CrossEntropyLoss()
    op = EFOperator(model, lf, (xb, yb), output_fn=lambda out: out[0])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters()}
    def loss(ps, x, y): return lf(torch.func.functional_call(model, {**params, **ps}, (x,))[0], y)
    G = torch.stack([torch.cat([g.reshape(-1) for g in torch.func.grad(loss)({n: params[n] for n in names}, xb[i:i+1], yb[i:i+1]).values()])
                     for i in range(len(xb))])
    v = torch.randn(G.shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matvec(v), G.T @ (G @ v) / len(xb), rtol=1e-4, atol=1e-6)
    assert op._sample_map.looped  # the loop ran: vmap refused this model
