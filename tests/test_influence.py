"Streaming influence (`analysis.influence`): rows equal the dense per-sample-gradient definition, the damping rule, convergence, memory."
import json, math, os, subprocess, sys, textwrap, warnings
import pytest, torch
from torch import nn
import fastcore.test as fct
from conftest import DEVICES
from fastsprkd.analysis import influence, per_sample_gradients, InfluenceResult
from fastsprkd.core import GGNOperator, HessianOperator, differentiable_attention
from fastsprkd.kfac import KFACOperator, EKFACOperator
from fastsprkd.data import digits_tensors

D = torch.float64


def dense_reference(model, lf, train, test, damping, names=None, curvature='hessian', C=None):
    """−G (C + damping·I)⁻¹ G_testᵀ from scratch: per-sample gradients by a loop of torch.func.grad on batches of one, the
    Hessian by torch.func.hessian of the mean training loss (eval mode), the GGN by GGNOperator's dense matrix."""
    model.eval()
    named = dict(model.named_parameters())
    names = names or [n for n, p in named.items() if p.requires_grad]
    sizes, shapes = [named[n].numel() for n in names], [named[n].shape for n in names]
    fixed = {**{k: v.detach() for k, v in named.items() if k not in names}, **dict(model.named_buffers())}
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    def loss(flat, x, y):
        ps = {n: c.reshape(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
        return lf(torch.func.functional_call(model, {**fixed, **ps}, (x,)), y)
    def grads(x, y): return torch.stack([torch.func.grad(loss)(theta, x[i:i+1], y[i:i+1]) for i in range(len(x))])
    if C is not None: pass
    elif curvature == 'hessian': C = torch.func.jacrev(torch.func.jacrev(loss))(theta, *train)  # reverse over reverse
    else: C = GGNOperator(model, lf, train, names).to_dense()
    return -grads(*train) @ torch.linalg.solve(C + damping * torch.eye(len(C), dtype=D), grads(*test).T)


def close(a, b, eps=1e-10):
    "Agreement to `eps` relative to the largest score (float64 round-off of a few hundred terms)."
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item() / max(1., b.abs().max().item())
    assert err <= eps, err


def digits(n_train, n_test=4, flat=False):
    x, y = digits_tensors()
    x = x.double().flatten(1) if flat else x.double()
    return (x[:n_train], y[:n_train]), (x[n_train:n_train + n_test], y[n_train:n_train + n_test])


def cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(48, 10)).double()
    with torch.no_grad(): m[1].running_mean.uniform_(-.1, .1); m[1].running_var.uniform_(.5, 1.5)
    return m


def test_streaming_rows_equal_the_dense_definition_mlp_and_cnn():
    ce = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()
    for model, (tr, te) in ((mlp, digits(80, flat=True)), (cnn(), digits(80))):
        model.train()
        want = dense_reference(model, ce, tr, te, 1.)
        model.train()  # influence evaluates in eval mode and restores the mode
        got = influence(model, ce, tr, te, damping=1., method="exact")
        assert isinstance(got, InfluenceResult) and got.rows == 'jvp' and model.training
        close(got.scores, want)
        assert got.residual < 1e-12 and got.converged and got.method == 'exact' and got.damping_rule == 'given'
        cg = influence(model, ce, tr, te, damping=1., tol=1e-12)
        close(cg.scores, want, 1e-9)
        assert cg.converged and cg.iterations > 0 and cg.num_matvecs >= cg.iterations and cg.residual <= 1e-12


def test_rows_in_order_over_unequal_batches_and_any_chunking():
    ce = nn.CrossEntropyLoss()
    model = cnn()
    tr, te = digits(100)
    ref = influence(model, ce, tr, te, damping=0.3, method='exact').scores
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tr), batch_size=37)  # 37, 37, 26
    close(influence(model, ce, dl, te, damping=0.3, method='exact').scores, ref)
    cuts = [(0, 10), (10, 63), (63, 100)]
    batches = [(tr[0][a:b], tr[1][a:b]) for a, b in cuts]
    close(influence(model, ce, iter(batches), iter([te]), damping=0.3, method='exact').scores, ref)  # one-shot iterators, both read once
    # one sample and one test point per vectorized chunk (a budget below one sample's activations), or 7 samples
    close(influence(model, ce, dl, te, damping=0.3, method='exact', memory_budget=1).scores, ref)
    close(influence(model, ce, dl, te, damping=0.3, method='exact', chunk_size=7).scores, ref)
    ps = influence(model, ce, dl, te, damping=0.3, method='exact', rows='per-sample gradients', chunk_size=5)
    assert ps.rows == 'per-sample gradients'
    close(ps.scores, ref)


def test_rows_and_columns_in_dataset_order_when_the_sampler_reorders():
    "A DataLoader whose sampler reads the dataset backwards: the scores still come in dataset order (rows and columns)."
    ce = nn.CrossEntropyLoss()
    model = cnn()
    tr, te = digits(60, n_test=5)
    ref = influence(model, ce, tr, te, damping=0.3, method='exact')
    backwards = lambda t, bs: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*t), batch_size=bs,
                                                          sampler=list(range(len(t[0]) - 1, -1, -1)))
    got = influence(model, ce, backwards(tr, 16), backwards(te, 2), damping=0.3, method='exact')
    close(got.scores, ref.scores)
    assert got.residuals.shape == ref.residuals.shape


def test_parameter_subset():
    ce = nn.CrossEntropyLoss()
    model = cnn()
    tr, te = digits(60)
    for params, names in ((model[5], ['5.weight', '5.bias']), (['0.weight', '5.bias'], ['0.weight', '5.bias'])):
        got = influence(model, ce, tr, te, params=params, damping=0.2, method='exact')
        assert got.names == names
        close(got.scores, dense_reference(model, ce, tr, te, 0.2, names))


class NoJvp(torch.autograd.Function):
    "tanh with a backward and a vmap rule for torch.func, but no forward-mode derivative (no jvp): forward mode fails on it."
    generate_vmap_rule = True
    @staticmethod
    def forward(x): return torch.tanh(x)
    @staticmethod
    def setup_context(ctx, inputs, output): ctx.save_for_backward(output)
    @staticmethod
    def backward(ctx, g):
        y, = ctx.saved_tensors; return g * (1 - y * y)


class TanhNoJvp(nn.Module):
    def forward(self, x): return NoJvp.apply(x)


def test_per_sample_gradient_fallback_where_forward_mode_is_unavailable():
    ce = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 5), nn.Tanh(), nn.Linear(5, 10)).double()
    custom = nn.Sequential(plain[0], TanhNoJvp(), plain[2])
    tr, te = digits(50, flat=True)
    ref = influence(plain, ce, tr, te, damping=0.4, method='exact', curvature='ggn')
    got = influence(custom, ce, tr, te, damping=0.4, method='exact', curvature='ggn')
    assert ref.rows == 'jvp' and got.rows == 'per-sample gradients'
    assert ref.rows_why == '' and got.rows_why.startswith('forward mode failed')
    close(got.scores, ref.scores)


class Tiny(nn.Module):
    "Embedding, a transformer encoder layer (attention), mean pooling and a linear head."
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=padding_idx)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.fc = nn.Linear(8, 3)
    def forward(self, t): return self.fc(self.enc(self.emb(t)).mean(1))


def test_transformer_and_padding_embedding():
    ce = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    tok, lab = torch.randint(0, 20, (30, 5), generator=g), torch.randint(0, 3, (30,), generator=g)
    tok[:, -1] = 0  # the padding token appears: its row of the embedding has a zero gradient under padding_idx=0
    tr, te = (tok[:24], lab[:24]), (tok[24:27], lab[24:27])
    for pad, rows in ((None, 'jvp'), (0, 'per-sample gradients')):
        torch.manual_seed(0)
        m = Tiny(pad).double()
        got = influence(m, ce, tr, te, damping=1., method='exact')
        assert got.rows == rows
        assert (pad is None) == (got.rows_why == '') and (pad is None or "'emb'" in got.rows_why)
        G, Gt = per_sample_gradients(m, ce, tr), per_sample_gradients(m, ce, te)
        H = HessianOperator(m, ce, tr).to_dense()  # torch.func's jacrev(jacrev) is off by 1e-2 on attention here; this matches finite differences
        if pad is None:  # the rows against a loop of torch.func.grad
            with differentiable_attention(): close(got.scores, dense_reference(m, ce, tr, te, 1., C=H))
        else:  # the padding row's gradient is zero: forward mode would not give it, the per-sample gradients' path does
            assert (G[:, :20 * 8].reshape(-1, 20, 8)[:, 0] == 0).all()
            close(got.scores, -G @ torch.linalg.solve(H + torch.eye(len(H), dtype=D), Gt.T))


def test_fastai_tabular_learner():
    import pandas as pd
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, Normalize, CrossEntropyLossFlat, CategoryBlock
    g = torch.Generator().manual_seed(0)
    n = 60
    df = pd.DataFrame({'a': torch.randint(0, 3, (n,), generator=g).tolist(), 'b': torch.randn(n, generator=g).tolist(),
                       'c': torch.randn(n, generator=g).tolist()})
    df['y'] = ((df.b + df.a * 0.5) > 0.5).astype(int)
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, Normalize], cat_names=['a'], cont_names=['b', 'c'], y_names='y',
                                     valid_idx=list(range(48, 60)), bs=16, y_block=CategoryBlock(), device='cpu', num_workers=0)
    torch.manual_seed(0)
    learn = tabular_learner(dls, layers=[6], n_out=2, loss_func=CrossEntropyLossFlat())
    learn.model.double()
    # fastai's losses compute in float32 whatever the model's dtype (its `tensor` casts float64 down): float64 here with torch's
    lf = lambda out, y: nn.functional.cross_entropy(out, y.view(-1).long())
    def dbl(dl): return [tuple(t.double() if t.is_floating_point() else t for t in b) for b in dl.new(shuffle=False, drop_last=False)]
    train, test = dbl(dls.train), dbl(dls.valid)[:1]
    got = influence(learn.model, lf, train, test, curvature='ggn', damping=0.1, method='exact', n_inp=2)
    assert got.rows == 'jvp' and got.scores.shape == (48, 12)
    G = per_sample_gradients(learn.model, lf, train, n_inp=2)
    Gt = per_sample_gradients(learn.model, lf, test, n_inp=2)
    C = GGNOperator(learn.model, lf, train, n_inp=2).to_dense()
    close(got.scores, -G @ torch.linalg.solve(C + 0.1 * torch.eye(len(C), dtype=D), Gt.T))
    # the learner's own loss and (shuffling) fastai loaders in float32: the same rows, in the training set's order
    learn.model.float()
    f32 = influence(learn.model, learn.loss_func, dls.train, dls.valid, curvature='ggn', damping=0.1, method='exact')
    fct.test_close(f32.scores.double(), got.scores, eps=1e-4 * got.scores.abs().max().item())


def test_kfac_and_ekfac_inverses():
    "curvature='kfac'/'ekfac' apply the operators' exact inverse: the same scores as a dense solve with their matrices."
    ce = nn.CrossEntropyLoss()
    model = cnn()
    tr, te = digits(60)
    for curvature, Op in (('kfac', KFACOperator), ('ekfac', EKFACOperator)):
        got = influence(model, ce, tr, te, curvature=curvature, damping=0.05)
        assert got.method == 'inverse' and got.rows == 'jvp' and got.residual < 1e-10 and got.curvature == curvature
        K = Op(model, ce, tr).to_dense()
        close(got.scores, dense_reference(model, ce, tr, te, 0.05, C=K))
        close(influence(model, ce, tr, te, curvature=curvature, damping=0.05, method='exact').scores, got.scores)
        d = influence(model, ce, tr, te, curvature=curvature)  # the rule from the factors' eigenvalues, exactly
        fct.test_close(d.damping, 1e-3 * torch.linalg.eigvalsh(K)[-1].item(), eps=1e-9)
        assert 'of its eigenvalues' in d.damping_rule
    fct.test_fail(lambda: influence(model, ce, tr, te, curvature='ekfac', method='cg'), contains="method must be 'inverse'")
    ek = influence(model, ce, tr, te, curvature='ekfac', damping=0.05, operator_kwargs=dict(fallback='exact'))
    close(ek.scores, dense_reference(model, ce, tr, te, 0.05, C=EKFACOperator(model, ce, tr, fallback='exact').to_dense()))


def test_kfac_and_ekfac_preconditioned_cg():
    "CG on the GGN preconditioned by K-FAC/EK-FAC (fitted on the same data) gives the exact GGN influence; bad choices refuse."
    ce = nn.CrossEntropyLoss()
    model = cnn()
    tr, te = digits(80)
    want = influence(model, ce, tr, te, curvature='ggn', damping=0.05, method='exact').scores
    for pre in ('kfac', 'ekfac', KFACOperator(model, ce, tr).inverse(0.05)):
        got = influence(model, ce, tr, te, curvature='ggn', damping=0.05, tol=1e-12, preconditioner=pre)
        assert got.converged and got.method == 'cg' and got.iterations > 0, got
        close(got.scores, want, 1e-9)
    with pytest.raises(ValueError, match="preconditioner is for method='cg'"):
        influence(model, ce, tr, te, curvature='ggn', damping=0.05, method='exact', preconditioner='kfac')
    with pytest.raises(ValueError, match="'kfac', 'ekfac' or a linear operator"):
        influence(model, ce, tr, te, curvature='ggn', damping=0.05, preconditioner='diag')


def test_default_damping_rule():
    ce = nn.CrossEntropyLoss()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 10)).double()
    tr, te = digits(64, flat=True)
    from fastsprkd.core import HessianOperator
    ev = torch.linalg.eigvalsh(HessianOperator(model, ce, tr).to_dense())
    assert ev[0] < 0  # an indefinite Hessian: the rule must lift it
    r = influence(model, ce, tr, te, tol=1e-10)
    want = -ev[0].item() + 1e-3 * ev[-1].item()
    assert abs(r.damping - want) <= 5e-4 * ev[-1].item(), (r.damping, want)
    assert ev[0].item() + r.damping > 0 and r.converged
    assert r.damping_rule.startswith('damping = max(0, −λ_min) + 0.001·λ_max') and 'λ_min = ' in r.damping_rule
    close(r.scores, influence(model, ce, tr, te, damping=r.damping, method='exact').scores, 1e-7)
    g = torch.linalg.eigvalsh(GGNOperator(model, ce, tr).to_dense())
    rg = influence(model, ce, tr, te, curvature='ggn', relative_damping=1e-2, tol=1e-10)
    assert abs(rg.damping - 1e-2 * g[-1].item()) <= 5e-3 * g[-1].item() and rg.damping_rule.startswith('damping = 0.01·λ_max')
    assert rg.curvature == 'ggn' and rg.num_matvecs > rg.iterations  # the rule's products are counted


def test_unconverged_solve_is_reported():
    ce = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()
    tr, te = digits(64, flat=True)
    with pytest.warns(UserWarning, match='influence: the cg solve did not converge'):
        r = influence(model, ce, tr, te, damping=1e-3, curvature='ggn', max_iter=2)
    assert not r.converged and r.iterations == 2 and r.residual > 1e-8 and r.residuals.shape == (4,)
    assert 'NOT converged' in repr(r)
    fct.test_close(r.residual, r.residuals.max().item())


def test_influence_bad_input():
    ce = nn.CrossEntropyLoss()
    model = nn.Linear(64, 10).double()
    tr, te = digits(40, flat=True)
    from torch.utils.data import DataLoader, TensorDataset
    fct.test_fail(lambda: influence(model, ce, tr, te, method='inverse'), contains="'cg', 'lissa' or 'exact'")
    fct.test_fail(lambda: influence(model, ce, tr, te, damping=-1.), contains='damping must be ≥ 0')
    fct.test_fail(lambda: influence(model, ce, tr, te, damping=1., rows='grad'), contains="rows must be 'jvp' or")
    fct.test_fail(lambda: influence(model, ce, DataLoader(TensorDataset(*tr), batch_size=16, drop_last=True), te, damping=.1),
                  contains='drop_last=False')
    fct.test_fail(lambda: influence(model, ce, tr, te, curvature='kfoo', damping=.1), contains='curvature must be one of')
    fct.test_fail(lambda: influence(model, ce, tr, (te[0][:0], te[1][:0]), damping=.1), contains='empty')


@pytest.mark.parametrize('device', DEVICES)
def test_on_each_device(device):
    "The streaming rows, the solve and the damping rule on the model's device: the CPU's float64 scores."
    ce = nn.CrossEntropyLoss()
    model = cnn()
    tr, te = digits(50)
    ref = influence(model, ce, tr, te, curvature='ggn', tol=1e-10)
    m = cnn().to(device)
    on = lambda b: tuple(t.to(device) for t in b)
    got = influence(m, ce, on(tr), on(te), curvature='ggn', tol=1e-10)
    assert got.scores.device.type == device and got.rows == 'jvp'
    fct.test_close(got.damping, ref.damping, eps=1e-6 * ref.damping)
    close(got.scores.cpu(), ref.scores, 1e-7)


# ---------------------------------------------------------------- memory
_SETUP = """
import warnings, torch
from torch import nn
torch.manual_seed(0)
from fastsprkd.analysis import influence, per_sample_gradients
from fastsprkd.data import digits_tensors
x, y = digits_tensors()
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(2048, 256), nn.ReLU(), nn.Linear(256, 10))
ce = nn.CrossEntropyLoss()
dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
with torch.no_grad(): model(x[:256])
"""
_JOBS = {
    'baseline': "pass",
    'per_sample': "G = per_sample_gradients(model, ce, (x[:256], y[:256])); assert G.shape == (256, 531914)",
    'influence': textwrap.dedent("""
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            r = influence(model, ce, dl, (x[:1], y[:1]), curvature='ggn', damping=0.1, max_iter=2)
        assert r.scores.shape == (1797, 1) and r.rows == 'jvp' and torch.isfinite(r.scores).all()"""),
}


def _peak_rss(jobs):
    "Peak RSS in bytes of a fresh process per job (run side by side: each process's own peak)."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    # VmHWM: the peak RSS of this address space (ru_maxrss would keep the forking parent's peak across exec on Linux)
    peak = "\nprint(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    procs = [subprocess.Popen([sys.executable, '-c', _SETUP + _JOBS[j] + peak],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for j in jobs]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=300)
        assert p.returncode == 0, se[-2000:]
        out.append(int(so.split()[-1]) * 1024)  # kB
    return out


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the peak RSS is read from /proc/self/status (Linux)')
def test_streaming_memory_stays_within_one_batch_of_per_sample_gradients():
    """All 1,797 digits, a 532k-parameter CNN, batches of 256: influence's peak RSS is within 2× that of computing one batch's
    per-sample gradients (256 × 532k floats, 545 MB), and what it adds over the same process without it is under half of
    what those gradients add (a batch × parameters block, as the per-sample-gradient rows held, would not pass)."""
    base, ps, inf = _peak_rss(('baseline', 'per_sample', 'influence'))
    assert ps - base > 256 * 531914 * 4 * 0.9, (base, ps)  # the reference did hold the block
    assert inf <= 2 * ps, (inf, ps)
    assert inf - base <= 0.5 * (ps - base), (base, ps, inf)


def test_loader_order_of_fastai_loaders():
    "An iterable dataset has no indices (its get_idxs never ends): None; a SortedDL-like reordering: its indices."
    from fastai.data.load import DataLoader
    from fastsprkd.curvature.functional import loader_order
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self): return iter([(torch.zeros(2), torch.tensor(0))] * 5)
    assert loader_order(DataLoader(Stream(), bs=2).new(shuffle=False)) is None
    items = list(zip(torch.randn(5, 2), torch.arange(5)))
    assert loader_order(DataLoader(items, bs=2).new(shuffle=False)) is None  # dataset order
    class Backwards(DataLoader):
        def get_idxs(self): return list(range(self.n))[::-1]
    assert loader_order(Backwards(items, bs=2).new(shuffle=False)) == [4, 3, 2, 1, 0]
