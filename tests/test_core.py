"Acceptance tests of the Hessian core (issue 3): `HessianOperator` against dense float64 `torch.func.hessian` references."
import copy, warnings
import pytest, torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset
import fastcore.test as fct
from hypothesis import given, settings, strategies as st
from conftest import DEVICES
from fastsprkd.core import HessianOperator, DenseOperator, as_operator, preserved_state
from fastsprkd.data import tensor_dls, digits_dls

F64 = torch.float64
CE = nn.CrossEntropyLoss()


# ---------------------------------------------------------------- models and data
def mlp(bn=False, drop=False, seed=0, d_in=4, hid=6, d_out=3):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, hid)] + ([nn.BatchNorm1d(hid)] if bn else []) + [nn.Tanh()]
    layers += ([nn.Dropout(0.3)] if drop else []) + [nn.Linear(hid, d_out)]
    m = nn.Sequential(*layers).double()
    _randomize_bn(m)
    return m

def cnn(bn=False, drop=False, seed=0):
    "Tiny CNN on 1×6×6 images: conv 3×3 (2 channels) → [BN] → tanh → maxpool 2 → [dropout] → linear 8→3 (47 parameters)."
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 2, 3)] + ([nn.BatchNorm2d(2)] if bn else []) + [nn.Tanh(), nn.MaxPool2d(2), nn.Flatten()]
    layers += ([nn.Dropout(0.3)] if drop else []) + [nn.Linear(8, 3)]
    m = nn.Sequential(*layers).double()
    _randomize_bn(m)
    return m

def _randomize_bn(m):
    "Non-trivial BatchNorm affine parameters and running statistics, so eval and train modes differ."
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, nn.modules.batchnorm._BatchNorm):
                b.weight.copy_(1 + 0.3 * torch.randn(b.weight.shape, generator=g, dtype=F64))
                b.bias.copy_(0.2 * torch.randn(b.bias.shape, generator=g, dtype=F64))
                b.running_mean.copy_(0.5 * torch.randn(b.running_mean.shape, generator=g, dtype=F64))
                b.running_var.copy_(0.5 + torch.rand(b.running_var.shape, generator=g, dtype=F64))

def make_data(kind, n=20, seed=0, d_in=4, n_cls=3):
    g = torch.Generator().manual_seed(seed)
    shape = (n, d_in) if kind == 'mlp' else (n, 1, 6, 6)
    return torch.randn(shape, generator=g, dtype=F64), torch.randint(0, n_cls, (n,), generator=g)

MODELS = {'mlp': lambda: mlp(), 'mlp_bn_drop': lambda: mlp(bn=True, drop=True),
          'cnn': lambda: cnn(), 'cnn_bn_drop': lambda: cnn(bn=True, drop=True)}


# ---------------------------------------------------------------- dense float64 reference
def reference(model, loss_func, batches, names=None, *, eval_mode=True, n_inp=1):
    """Dense Hessian, gradient and loss of the sample-weighted mean loss over `batches` w.r.t. the flattened
    parameters `names` (default all), from `torch.func.hessian` of `functional_call` on a float64 CPU copy.
    With `eval_mode=False`, train-mode BatchNorm uses batch statistics (its running statistics, which do not enter
    the output, are dropped so that the function is pure)."""
    m = copy.deepcopy(model).cpu()
    if eval_mode: m.eval()
    train_bn = False
    for b in m.modules():
        if isinstance(b, nn.modules.batchnorm._BatchNorm) and b.training:
            b.track_running_stats, train_bn = False, True
            b.running_mean = b.running_var = b.num_batches_tracked = None
    named = dict(m.named_parameters())
    names = list(named) if names is None else list(names)
    shapes, sizes = [named[k].shape for k in names], [named[k].numel() for k in names]
    fixed = {k: p.detach() for k, p in named.items() if k not in names}
    fixed.update({k: b for k, b in m.named_buffers()})
    batches = [tuple(t.cpu() for t in b) for b in batches]
    N = sum(b[0].shape[0] for b in batches)
    def f(flat):
        ps = {k: c.view(s) for k, c, s in zip(names, flat.split(sizes), shapes)}
        tot = 0.
        for b in batches:
            pred = functional_call(m, {**fixed, **ps}, tuple(b[:n_inp]))
            tot = tot + loss_func(pred, *b[n_inp:]) * (b[0].shape[0] / N)
        return tot
    theta = torch.cat([named[k].detach().reshape(-1) for k in names])
    # torch.func.hessian (and jacrev∘jacrev) of train-mode batch_norm is wrong and not even symmetric in torch 2.x
    # (a batching-rule bug of its double backward; jvp∘grad and plain autograd are right): use plain autograd there.
    H = torch.autograd.functional.hessian(f, theta) if train_bn else torch.func.hessian(f)(theta)
    assert (H - H.T).norm() <= 1e-12 * H.norm(), "reference Hessian is not symmetric"
    return H, torch.func.grad(f)(theta), f(theta).detach()

def close(a, b, tol=1e-10):
    a, b = a.detach().cpu().to(F64), b.detach().cpu().to(F64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).norm() / b.norm().clamp_min(1e-300)
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"

def rand(n, k=None, seed=0, device='cpu', dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) if k is None else (n, k), generator=g, dtype=F64).to(device=device, dtype=dtype)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('mode', ['fwd', 'rev', 'auto'])
@pytest.mark.parametrize('kind', list(MODELS))
def test_exact_reference(kind, mode, device):
    model = MODELS[kind]().train()          # train mode: eval_mode=True must give the eval-mode Hessian
    x, y = make_data(kind.split('_')[0])
    H, g, L = reference(model, CE, [(x, y)])
    model.to(device)
    op = HessianOperator(model, CE, (x.to(device), y.to(device)), mode=mode)
    assert op.device.type == device and op.dtype == F64
    n = op.num_params
    fct.test_eq(n, sum(p.numel() for p in model.parameters()))
    fct.test_eq(op.shape, (n, n))
    close(op.to_dense(), H)
    v, V = rand(n, seed=1, device=device), rand(n, 5, seed=2, device=device)
    close(op.matvec(v), H @ v.cpu())
    close(op @ v, H @ v.cpu())
    close(op.matmat(V), H @ V.cpu())
    close(op @ V, H @ V.cpu())
    fct.test_eq(op.num_matvecs, n + 1 + 1 + 5 + 5)
    close(op.gradient(), g)
    close(op.loss(), L)
    assert op.loss().dim() == 0
    assert all(m.training for m in model.modules()), "the model must be left in train mode"


@pytest.mark.parametrize('mode', ['fwd', 'rev'])
@pytest.mark.parametrize('kind', ['mlp', 'cnn'])
def test_train_mode_batchnorm_on_fixed_batch(kind, mode):
    "eval_mode=False with BatchNorm in train mode is a deterministic function of the batch: the train-mode Hessian."
    model = (mlp if kind == 'mlp' else cnn)(bn=True).train()
    x, y = make_data(kind)
    H, g, L = reference(model, CE, [(x, y)], eval_mode=False)
    He, _, _ = reference(model, CE, [(x, y)], eval_mode=True)
    assert (H - He).norm() > 1e-3 * H.norm()  # train and eval Hessians differ: the test can tell them apart
    op = HessianOperator(model, CE, (x, y), eval_mode=False, mode=mode)
    close(op.to_dense(), H)
    close(op.matvec(rand(op.num_params)), H @ rand(op.num_params))
    close(op.gradient(), g)
    close(op.loss(), L)
    op.check_determinism()
    # a model in eval mode stays in eval mode with eval_mode=False: the eval Hessian
    model.eval()
    close(HessianOperator(model, CE, (x, y), eval_mode=False, mode=mode).to_dense(), He)


def test_float32_model():
    "Device and dtype follow the model: a float32 model gives a float32 operator, close to the float64 Hessian."
    model, (x, y) = mlp(), make_data('mlp')
    H, _, _ = reference(model, CE, [(x, y)])
    op = HessianOperator(model.float(), CE, (x.float(), y))
    assert op.dtype == torch.float32
    A = op.to_dense()
    assert A.dtype == torch.float32
    close(A, H, tol=1e-5)


def _scale_inplace(model):
    with torch.no_grad():
        for p in model.parameters(): p.mul_(1.5)

def _scale_dot_data(model):
    for p in model.parameters(): p.data.mul_(1.5)      # `.data` updates do not bump autograd's version counter

def _assign_dot_data(model):
    for p in model.parameters(): p.data = p.data * 1.5

def _fastai_sgd_step(model, x, y):
    from fastai.optimizer import SGD                    # fastai's optimizers update `p.data` in place
    opt = SGD(list(model.parameters()), lr=0.5)
    CE(model(x), y).backward(); opt.step(); opt.zero_grad()

def _torch_adam_step(model, x, y):
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    CE(model(x), y).backward(); opt.step(); opt.zero_grad()

@pytest.mark.parametrize('mode', ['fwd', 'rev', 'auto'])
@pytest.mark.parametrize('update', ['inplace', 'dot_data', 'assign_data', 'fastai_sgd', 'torch_adam', 'load_state_dict'])
def test_reads_current_parameter_values(update, mode):
    "The operator is reusable as the model trains: it reads the model's parameters on every call, however they changed."
    model, (x, y) = mlp(bn=True), make_data('mlp')
    op = HessianOperator(model, CE, (x, y), mode=mode)
    v, V = rand(op.num_params), rand(op.num_params, 3)
    H0, _, _ = reference(model, CE, [(x, y)])
    close(op.matvec(v), H0 @ v); close(op.matvec(v), H0 @ v); close(op.matmat(V), H0 @ V)
    if update == 'inplace': _scale_inplace(model)
    elif update == 'dot_data': _scale_dot_data(model)
    elif update == 'assign_data': _assign_dot_data(model)
    elif update == 'fastai_sgd': _fastai_sgd_step(model, x, y)
    elif update == 'torch_adam': _torch_adam_step(model, x, y)
    else: model.load_state_dict(mlp(bn=True, seed=5).state_dict())
    H1, g1, L1 = reference(model, CE, [(x, y)])
    assert (H1 - H0).norm() > 1e-3 * H1.norm()
    close(op.matvec(v), H1 @ v)
    close(op.matmat(V), H1 @ V)
    close(op.gradient(), g1)
    close(op.loss(), L1)


# ---------------------------------------------------------------- parameter subsets
@pytest.mark.parametrize('mode', ['fwd', 'rev'])
def test_subset_of_parameters(mode):
    model, (x, y) = cnn(bn=True, drop=True), make_data('cnn')
    names = [k for k, _ in model.named_parameters()]   # 0.weight 0.bias 1.weight 1.bias 6.weight 6.bias
    H, _, _ = reference(model, CE, [(x, y)])
    H_sub, g_sub, _ = reference(model, CE, [(x, y)], names=['0.weight', '6.weight', '6.bias'])
    offs, o = {}, 0
    for k, p in model.named_parameters(): offs[k] = range(o, o + p.numel()); o += p.numel()
    idx = [i for k in ['0.weight', '6.weight', '6.bias'] for i in offs[k]]
    close(H_sub, H[idx][:, idx], tol=1e-12)     # the reference block is the block of the full reference
    ways = {'parameters': [model[6].bias, model[0].weight, model[6].weight],       # order does not matter
            'modules+param': [model[6], model[0].weight],
            'names': ['0.weight', '6'],
            'mixed': ['6.weight', model[6].bias, model[0].weight]}
    for how, params in ways.items():
        op = HessianOperator(model, CE, (x, y), params=params, mode=mode)
        fct.test_eq(op.names, ['0.weight', '6.weight', '6.bias'])
        assert [id(p) for p in op.params] == [id(model[0].weight), id(model[6].weight), id(model[6].bias)]
        fct.test_eq(op.num_params, len(idx))
        close(op.to_dense(), H_sub)
        close(op.gradient(), g_sub)
    # a single module / name / parameter
    close(HessianOperator(model, CE, (x, y), params=model[1], mode=mode).to_dense(), H[offs['1.weight'].start:offs['1.bias'].stop,
                                                                                            offs['1.weight'].start:offs['1.bias'].stop])
    close(HessianOperator(model, CE, (x, y), params='6.bias', mode=mode).to_dense(), H[offs['6.bias']][:, offs['6.bias']])
    # the whole model as a module
    close(HessianOperator(model, CE, (x, y), params=model, mode=mode).to_dense(), H)


class Tied(nn.Module):
    "`b.weight` is `a.weight` (tied): named_parameters lists it once, as 'a.weight'."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b.weight = self.a.weight
    def forward(self, x): return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

@pytest.mark.parametrize('mode', ['fwd', 'rev'])
def test_tied_weights(mode):
    "A tied weight is one parameter (total derivative through both uses); selecting a module selects its tied weight."
    model, (x, y) = Tied().double(), make_data('mlp')
    H, g, _ = reference(model, CE, [(x, y)])
    op = HessianOperator(model, CE, (x, y), mode=mode)
    fct.test_eq(op.names, ['a.weight', 'a.bias', 'b.bias', 'c.weight', 'c.bias'])
    close(op.to_dense(), H)
    close(op.gradient(), g)
    H_b, _, _ = reference(model, CE, [(x, y)], names=['a.weight', 'b.bias'])
    for params in (model.b, 'b', ['b.weight', 'b.bias'], [model.a.weight, model.b.bias]):
        sub = HessianOperator(model, CE, (x, y), params=params, mode=mode)
        fct.test_eq(sub.names, ['a.weight', 'b.bias'])
        close(sub.to_dense(), H_b)


def test_default_params_are_the_trainable_ones():
    model, (x, y) = mlp(), make_data('mlp')
    model[0].requires_grad_(False)
    op = HessianOperator(model, CE, (x, y))
    fct.test_eq(op.names, ['2.weight', '2.bias'])
    H, _, _ = reference(model, CE, [(x, y)], names=['2.weight', '2.bias'])
    close(op.to_dense(), H)
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad


def test_flatten_unflatten():
    model, (x, y) = mlp(), make_data('mlp')
    op = HessianOperator(model, CE, (x, y), params=['0.bias', '2'])
    v = rand(op.num_params)
    parts = op.unflatten(v)
    fct.test_eq([t.shape for t in parts], [model[0].bias.shape, model[2].weight.shape, model[2].bias.shape])
    assert torch.equal(op.flatten(parts), v)
    assert torch.equal(op.flatten(dict(zip(op.names, parts))), v)
    V = rand(op.num_params, 3)
    fct.test_eq(op.unflatten(V)[1].shape, (*model[2].weight.shape, 3))
    fct.test_fail(lambda: op.flatten(parts[:2]), contains='one per parameter')
    fct.test_fail(lambda: op.flatten([parts[0], parts[2], parts[1]]), contains='expected')


# ---------------------------------------------------------------- data: several batches, DataLoaders, n_inp
@pytest.mark.parametrize('mode', ['fwd', 'rev'])
def test_batches_of_unequal_size(mode):
    model, (x, y) = cnn(bn=True, drop=True), make_data('cnn', n=20)
    batches = [(x[:7], y[:7]), (x[7:12], y[7:12]), (x[12:], y[12:])]
    H, g, L = reference(model, CE, [(x, y)])
    op = HessianOperator(model, CE, batches, mode=mode)
    fct.test_eq(op.num_samples, 20)
    close(op.to_dense(), H)
    close(op.matvec(rand(op.num_params)), H @ rand(op.num_params))
    close(op.gradient(), g)
    close(op.loss(), L)
    # unequal sizes matter: the plain (unweighted) mean of the batch Hessians is a different matrix
    Hs = [reference(model, CE, [b])[0] for b in batches]
    assert (sum(Hs) / 3 - H).norm() > 1e-4 * H.norm()
    # the same with a one-shot generator of batches (kept for the later sweeps)
    op2 = HessianOperator(model, CE, (b for b in batches), mode=mode)
    V = rand(op.num_params, 3)
    close(op2.matmat(V), H @ V)
    close(op2.matmat(V), H @ V)


def test_torch_dataloader_equals_one_batch():
    model, (x, y) = mlp(bn=True, drop=True), make_data('mlp', n=20)
    one = HessianOperator(model, CE, (x, y))
    dl = DataLoader(TensorDataset(x, y), batch_size=6)      # batches of 6, 6, 6, 2
    op = HessianOperator(model, CE, dl)
    fct.test_eq(op.num_samples, 20)
    close(op.to_dense(), one.to_dense())
    close(op.gradient(), one.gradient())
    close(op.loss(), one.loss())
    close(op.to_dense(), reference(model, CE, [(x, y)])[0])


def test_shuffling_torch_dataloader_warns():
    model, (x, y) = mlp(), make_data('mlp')
    with pytest.warns(UserWarning, match='shuffle'):
        HessianOperator(model, CE, DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True))
    with pytest.warns(UserWarning, match='drop'):
        HessianOperator(model, CE, DataLoader(TensorDataset(x, y), batch_size=6, drop_last=True))


def test_fastai_dataloader_equals_one_batch():
    "A fastai training DataLoader (which shuffles and drops its last batch) covers all its items, in any order."
    model, (x, y) = cnn(bn=True), make_data('cnn', n=25)
    dls = tensor_dls(x, y, torch.arange(18), torch.arange(18, 25), bs=4, device='cpu')
    assert dls.train.shuffle and dls.train.drop_last
    op = HessianOperator(model, CE, dls.train)
    fct.test_eq(op.num_samples, 18)
    H, g, L = reference(model, CE, [(x[:18], y[:18])])
    close(op.to_dense(), H)
    close(op.gradient(), g)
    close(op.loss(), L)
    close(HessianOperator(model, CE, dls.valid, mode='fwd').to_dense(), reference(model, CE, [(x[18:], y[18:])])[0])


def test_digits_dls_equals_one_batch():
    "The bundled digits (float32) through fastai: same operator as one float32 batch holding all the training items."
    from fastai.losses import CrossEntropyLossFlat
    dls = digits_dls(bs=8, n_train=30, device='cpu')
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(9, 10))
    xs, ys = dls.train_ds.tensors
    op, one = HessianOperator(model, CrossEntropyLossFlat(), dls.train), HessianOperator(model, CE, (xs, ys))
    fct.test_eq(op.num_samples, 30)
    V = rand(op.num_params, 6, dtype=torch.float32)
    HV = op.matmat(V)
    close(HV, one.matmat(V), tol=1e-5)
    close(op.gradient(), one.gradient(), tol=1e-5)
    close(op.loss(), one.loss(), tol=1e-6)
    H = reference(copy.deepcopy(model).double(), CE, [(xs.double(), ys)])[0]
    close(HV, H @ V.double(), tol=1e-4)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(2, 5), nn.Linear(5, 3)
    def forward(self, xa, xb): return self.head(torch.tanh(self.a(xa) + self.b(xb)))

@pytest.mark.parametrize('mode', ['fwd', 'rev'])
def test_multi_input_batches(mode):
    model = TwoInputs().double()
    g = torch.Generator().manual_seed(3)
    xa, xb, y = torch.randn(15, 4, generator=g, dtype=F64), torch.randn(15, 2, generator=g, dtype=F64), torch.randint(0, 3, (15,), generator=g)
    H, grad_, L = reference(model, CE, [(xa, xb, y)], n_inp=2)
    for kw in ({}, {'n_inp': 2}):   # all but the last item are inputs by default
        op = HessianOperator(model, CE, (xa, xb, y), mode=mode, **kw)
        close(op.to_dense(), H)
        close(op.gradient(), grad_)
        close(op.loss(), L)
    op = HessianOperator(model, CE, [(xa[:4], xb[:4], y[:4]), (xa[4:], xb[4:], y[4:])], n_inp=2, mode=mode)
    close(op.to_dense(), H)
    # a DataLoader with n_inp=2
    op = HessianOperator(model, CE, DataLoader(TensorDataset(xa, xb, y), batch_size=4), n_inp=2, mode=mode)
    close(op.to_dense(), H)
    # one input and two targets
    def two_targets(pred, t, w): return CE(pred, t) + (w * pred.pow(2).sum(1)).mean()
    w = torch.rand(15, generator=g, dtype=F64)
    m1 = mlp()
    H1, _, _ = reference(m1, two_targets, [(xa, y, w)], n_inp=1)
    close(HessianOperator(m1, two_targets, (xa, y, w), n_inp=1, mode=mode).to_dense(), H1)


# ---------------------------------------------------------------- matmat and counting
@pytest.mark.parametrize('mode', ['fwd', 'rev'])
def test_matmat_chunks_and_counts(mode):
    model, (x, y) = mlp(), make_data('mlp')
    H, _, _ = reference(model, CE, [(x, y)])
    n = H.shape[0]
    V = rand(n, 7, seed=4)
    for chunk in (None, 1, 3, 100):
        op = HessianOperator(model, CE, [(x[:9], y[:9]), (x[9:], y[9:])], mode=mode, chunk_size=chunk)
        close(op.matmat(V), H @ V)
        fct.test_eq(op.num_matvecs, 7)
        op.matvec(V[:, 0]); fct.test_eq(op.num_matvecs, 8)
        fct.test_eq(op.matmat(V[:, :0]).shape, (n, 0)); fct.test_eq(op.num_matvecs, 8)
        if chunk is None: op.to_dense(); fct.test_eq(op.num_matvecs, 8 + n)
    # a tiny memory budget forces one vector per chunk and stays exact
    op = HessianOperator(model, CE, (x, y), mode=mode, memory_budget=1)
    close(op.matmat(V), H @ V)


@pytest.mark.parametrize('strategy', [None, 'vmap', 'loop'])
@pytest.mark.parametrize('kind', ['mlp', 'cnn'])
def test_rev_matmat_strategies(kind, strategy):
    "Reverse-over-reverse `matmat`, vmapped over the backward pass or one pass per column (None: timed), is exact: kept graph, chunks, batches, updates."
    model, (x, y) = (mlp if kind == 'mlp' else cnn)(bn=True, drop=True).train(), make_data(kind)
    H, _, _ = reference(model, CE, [(x, y)])
    V = rand(H.shape[0], 6, seed=7)
    for data, chunk in [((x, y), None), ((x, y), 4), ([(x[:7], y[:7]), (x[7:], y[7:])], None)]:
        op = HessianOperator(model, CE, data, mode='rev', chunk_size=chunk)
        op._rev_many = strategy
        close(op.matmat(V), H @ V)
        close(op.matmat(V), H @ V)  # graph kept (single batch) or rebuilt
        assert op._rev_many in ('vmap', 'loop') and (strategy is None or op._rev_many == strategy)
        close(op.matvec(V[:, 0]), H @ V[:, 0])
        if chunk is None and isinstance(data, tuple): kept = op
    for update in (_scale_inplace, _scale_dot_data):  # the kept graph is rebuilt after an update, also one through `.data`
        update(model)
        close(kept.matmat(V), reference(model, CE, [(x, y)])[0] @ V)
    model = (mlp if kind == 'mlp' else cnn)(bn=True).train()  # train-mode BatchNorm (batch statistics), eval_mode=False
    op = HessianOperator(model, CE, (x, y), mode='rev', eval_mode=False)
    op._rev_many = strategy
    close(op.matmat(V), reference(model, CE, [(x, y)], eval_mode=False)[0] @ V)


# ---------------------------------------------------------------- forward-mode fallback
class SquareNoJvp(torch.autograd.Function):
    "x², with a backward but no jvp (nor vmap) rule: forward-mode AD raises on it."
    @staticmethod
    def forward(x): return x * x
    @staticmethod
    def setup_context(ctx, inputs, output): ctx.save_for_backward(inputs[0])
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

class SquareOldStyle(torch.autograd.Function):
    "x² as an old-style autograd.Function (no setup_context): torch.func transforms refuse it."
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

class SquareNet(nn.Module):
    def __init__(self, fn=None):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.fn = nn.Linear(4, 5), nn.Linear(5, 3), fn
    def forward(self, x):
        h = self.l1(x)
        return self.l2(h * h if self.fn is None else self.fn.apply(h))

@pytest.mark.parametrize('fn', [SquareNoJvp, SquareOldStyle])
def test_forward_mode_missing_falls_back(fn):
    x, y = make_data('mlp', n=12)
    plain, model = SquareNet().double(), SquareNet(fn).double()
    with pytest.raises(Exception):      # forward-mode AD really is missing for this model
        torch.func.jvp(lambda t: model(t), (x,), (torch.ones_like(x),))
    H, g, L = reference(plain, CE, [(x, y)])   # same weights, h*h instead of the custom Function
    n = H.shape[0]
    v, V = rand(n), rand(n, 4)
    op = HessianOperator(model, CE, (x, y), mode='fwd')
    with pytest.warns(UserWarning, match='rev'):
        close(op.matmat(V), H @ V)
    close(op.matvec(v), H @ v)
    close(op.to_dense(), H)
    op = HessianOperator(model, CE, (x, y), mode='fwd')
    with pytest.warns(UserWarning, match='rev'):
        close(op.matvec(v), H @ v)
    close(op.gradient(), g)
    close(op.loss(), L)
    for mode in ('auto', 'rev'):
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            op = HessianOperator(model, CE, (x, y), mode=mode)
            close(op.to_dense(), H)
            close(op.matvec(v), H @ v)
            close(op.gradient(), g)
            close(op.loss(), L)


# ---------------------------------------------------------------- determinism check
def test_check_determinism():
    model, (x, y) = mlp(drop=True).train(), make_data('mlp')
    torch.manual_seed(0)
    op = HessianOperator(model, CE, (x, y), eval_mode=False)
    with pytest.raises(RuntimeError) as e: op.check_determinism()
    assert 'Dropout' in str(e.value) and 'shuffling' in str(e.value)
    with pytest.raises(RuntimeError, match='Dropout'):
        HessianOperator(model, CE, (x, y), eval_mode=False, check_determinism=True)
    assert model.training and model[2].training
    # deterministic settings pass
    assert HessianOperator(model, CE, (x, y)).check_determinism() <= 1e-12
    assert HessianOperator(model, CE, (x, y), check_determinism=True, mode='fwd').check_determinism() <= 1e-12
    bn = mlp(bn=True).train()
    assert HessianOperator(bn, CE, (x, y), eval_mode=False, check_determinism=True).check_determinism() <= 1e-12
    # Dropout in eval mode with eval_mode=False is deterministic too
    model.eval()
    HessianOperator(model, CE, (x, y), eval_mode=False, check_determinism=True)


# ---------------------------------------------------------------- state restoration
def snapshot(model):
    return {'modes': [(n, m.training) for n, m in model.named_modules()],
            'grads': [(n, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
            'grad_ids': [(n, id(p.grad) if p.grad is not None else None) for n, p in model.named_parameters()],
            'flags': [(n, p.requires_grad) for n, p in model.named_parameters()],
            'values': [(n, p.detach().clone()) for n, p in model.named_parameters()],
            'buffers': [(n, b.clone()) for n, b in model.named_buffers()],
            'param_ids': [id(p) for p in model.parameters()]}

def assert_same_state(model, s):
    t = snapshot(model)
    fct.test_eq(t['modes'], s['modes'])
    fct.test_eq(t['flags'], s['flags'])
    fct.test_eq(t['param_ids'], s['param_ids'])
    for (n, a), (_, b) in zip(t['grads'], s['grads']):
        assert (a is None) == (b is None), f".grad of {n}: None-ness changed"
        if a is not None: assert torch.equal(a, b), f".grad of {n} changed"
    for (n, a), (_, b) in list(zip(t['values'], s['values'])) + list(zip(t['buffers'], s['buffers'])):
        assert torch.equal(a, b), f"{n} changed"
    assert all(not p.is_inference() and p.grad_fn is None for p in model.parameters())

def messy_model():
    "A CNN with BatchNorm and Dropout in mixed modes, some existing .grad, a frozen tensor."
    m = cnn(bn=True, drop=True).train()
    m[1].eval()                        # BatchNorm in eval mode, the rest in train mode
    m[0].weight.grad = torch.full_like(m[0].weight, 0.5)
    m[6].bias.grad = torch.ones_like(m[6].bias)
    m[0].bias.requires_grad_(False)
    return m

@pytest.mark.parametrize('eval_mode', [True, False])
@pytest.mark.parametrize('mode', ['fwd', 'rev'])
def test_state_is_restored(mode, eval_mode):
    model, (x, y) = messy_model(), make_data('cnn')
    m2 = cnn(bn=True).train()          # train-mode BatchNorm: its running statistics must not move
    for m in (model, m2):
        s = snapshot(m)
        op = HessianOperator(m, CE, [(x[:8], y[:8]), (x[8:], y[8:])], mode=mode, eval_mode=eval_mode)
        assert_same_state(m, s)
        calls = [lambda: op.matvec(rand(op.num_params)), lambda: op.matmat(rand(op.num_params, 3)), op.gradient, op.loss]
        if eval_mode or m is m2: calls.append(op.check_determinism)
        for call in calls:
            call()
            assert_same_state(m, s)
        last = list(m.named_children())[-1][0]
        sub = HessianOperator(m, CE, (x, y), params=[m[0].bias, last], mode=mode, eval_mode=eval_mode)  # a frozen one too
        sub.matmat(rand(sub.num_params, 2)); sub.gradient()
        assert_same_state(m, s)


class Boom(Exception): pass

def failing_loss(fail_at, exc=Boom, always=False):
    "Cross-entropy that raises on its `fail_at`-th call after `arm()` (and on every later call if `always`)."
    state = {'n': 0, 'armed': False}
    def lf(pred, y):
        if state['armed']:
            state['n'] += 1
            if state['n'] == fail_at or (always and state['n'] > fail_at): raise exc('loss function failed midway')
        return CE(pred, y)
    lf.arm = lambda: state.update(n=0, armed=True)
    return lf

@pytest.mark.parametrize('mode', ['fwd', 'rev'])
@pytest.mark.parametrize('method', ['matvec', 'matmat', 'to_dense', 'gradient', 'loss', 'check_determinism'])
def test_state_is_restored_when_loss_raises(method, mode):
    model, (x, y) = messy_model(), make_data('cnn')
    s = snapshot(model)
    lf = failing_loss(2)
    op = HessianOperator(model, lf, [(x[:7], y[:7]), (x[7:14], y[7:14]), (x[14:], y[14:])], mode=mode, eval_mode=False)
    lf.arm()    # the 2nd loss evaluation (on the 2nd batch, midway through the sweep) raises
    n = op.num_params
    call = {'matvec': lambda: op.matvec(rand(n)), 'matmat': lambda: op.matmat(rand(n, 3)), 'to_dense': op.to_dense,
            'gradient': op.gradient, 'loss': op.loss, 'check_determinism': op.check_determinism}[method]
    with pytest.raises(Boom, match='midway'): call()
    assert_same_state(model, s)

@pytest.mark.parametrize('mode', ['fwd', 'rev'])
def test_runtime_error_in_loss_propagates(mode):
    "A RuntimeError from the user's code propagates (whatever fallback the fwd mode tries), the state is restored."
    model, (x, y) = messy_model(), make_data('cnn')
    s = snapshot(model)
    lf = failing_loss(1, RuntimeError, always=True)
    op = HessianOperator(model, lf, (x, y), mode=mode)
    lf.arm()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for call in (lambda: op.matvec(rand(op.num_params)), lambda: op.matmat(rand(op.num_params, 2)), op.gradient, op.loss):
            with pytest.raises(RuntimeError, match='midway'): call()
            assert_same_state(model, s)

def test_preserved_state_on_exception():
    model = messy_model()
    s = snapshot(model)
    with pytest.raises(Boom):
        with preserved_state(model):
            model.eval(); model[3].train()
            for p in model.parameters():
                p.requires_grad_(True); p.grad = None
            with torch.no_grad():
                for p in model.parameters(): p.add_(1.)
                for b in model.buffers(): b.add_(1)
            raise Boom()
    assert_same_state(model, s)


def test_preserved_state_keeps_grad_references():
    "copy_grads=False restores the very `.grad` tensors (none copied), also when they were replaced or removed inside."
    model = messy_model()
    s, grads = snapshot(model), [p.grad for p in model.parameters()]
    with pytest.raises(Boom):
        with preserved_state(model, values=False, copy_grads=False):
            for p in model.parameters(): p.grad = torch.zeros_like(p)
            model.eval()
            raise Boom()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert_same_state(model, s)

# ---------------------------------------------------------------- bad input
@pytest.fixture
def small_op():
    model, (x, y) = mlp(), make_data('mlp')
    return HessianOperator(model, CE, (x, y))

def test_bad_vectors(small_op):
    op, n = small_op, small_op.num_params
    fct.test_fail(lambda: op.matvec(torch.zeros(n + 1, dtype=F64)), contains=f'shape ({n},)')
    fct.test_fail(lambda: op.matvec(torch.zeros(n, 1, dtype=F64)), contains=f'shape ({n},)')
    fct.test_fail(lambda: op.matmat(torch.zeros(n - 1, 2, dtype=F64)), contains=f'({n}, K)')
    fct.test_fail(lambda: op @ torch.zeros(2 * n, dtype=F64), contains='flatten')
    fct.test_fail(lambda: op.matvec(torch.zeros(n)), contains='dtype torch.float64')
    fct.test_fail(lambda: op.matmat(torch.zeros(n, 2, dtype=torch.float32)), contains='dtype')
    fct.test_fail(lambda: op.matvec(torch.zeros(n, dtype=F64, device='meta')), contains='device')
    fct.test_fail(lambda: op.matmat(torch.zeros(n, 2, dtype=F64, device='meta')), contains='move it')
    fct.test_fail(lambda: op.matvec([0.] * n), contains='torch.Tensor')
    fct.test_eq(op.num_matvecs, 0)

def test_empty_data():
    model = mlp()
    fct.test_fail(lambda: HessianOperator(model, CE, []), contains='empty')
    empty = TensorDataset(torch.zeros(0, 4, dtype=F64), torch.zeros(0, dtype=torch.long))
    fct.test_fail(lambda: HessianOperator(model, CE, DataLoader(empty, batch_size=4)), contains='empty')
    fct.test_fail(lambda: HessianOperator(model, CE, (torch.zeros(0, 4, dtype=F64), torch.zeros(0, dtype=torch.long))), contains='empty')
    fct.test_fail(lambda: HessianOperator(model, CE, iter([])), contains='empty')

def test_empty_batch_among_others_is_skipped():
    model, (x, y) = mlp(), make_data('mlp')
    op = HessianOperator(model, CE, [(x[:0], y[:0]), (x[:5], y[:5]), (x[5:5], y[5:5]), (x[5:], y[5:])])
    fct.test_eq(op.num_samples, 20)
    H, g, L = reference(model, CE, [(x, y)])
    close(op.to_dense(), H)
    close(op.gradient(), g)
    close(op.loss(), L)

def test_bad_data_type():
    fct.test_fail(lambda: HessianOperator(mlp(), CE, torch.zeros(3, 4, dtype=F64)), contains='batch (x, y)')
    fct.test_fail(lambda: HessianOperator(mlp(), CE, [torch.zeros(3, 4, dtype=F64), 3]), contains='tuple (x, y)')

def test_non_scalar_loss():
    x, y = make_data('mlp')
    fct.test_fail(lambda: HessianOperator(mlp(), nn.CrossEntropyLoss(reduction='none'), (x, y)), contains="reduction='mean'")
    fct.test_fail(lambda: HessianOperator(mlp(), nn.CrossEntropyLoss(reduction='none'), (x, y)), contains='scalar')

def test_nan_loss():
    x, y = make_data('mlp')
    xn = x.clone(); xn[3, 1] = float('nan')
    fct.test_fail(lambda: HessianOperator(mlp(), CE, (xn, y)), contains='nan')
    fct.test_fail(lambda: HessianOperator(mlp(), lambda p, t: CE(p, t) * float('inf'), (x, y)), contains='inf')
    # a NaN on a later batch only: caught on the first sweep, naming the batch
    for mode in ('fwd', 'rev'):
        op = HessianOperator(mlp(), CE, [(x[:10], y[:10]), (xn, y)], mode=mode)
        fct.test_fail(lambda: op.matvec(rand(op.num_params)), contains='batch 1')
        fct.test_fail(op.gradient, contains='batch 1')
        fct.test_fail(op.loss, contains='batch 1')

def test_params_not_in_model():
    model, (x, y) = mlp(), make_data('mlp')
    other = mlp(seed=1)
    fct.test_fail(lambda: HessianOperator(model, CE, (x, y), params=[nn.Parameter(torch.zeros(6, 4, dtype=F64))]),
                  contains='not a parameter of the model')
    fct.test_fail(lambda: HessianOperator(model, CE, (x, y), params=[other[0].weight]), contains='not a parameter of the model')
    fct.test_fail(lambda: HessianOperator(model, CE, (x, y), params=['0.weight', 'fc.weight']), contains="'fc.weight'")
    fct.test_fail(lambda: HessianOperator(model, CE, (x, y), params='0.weigh'), contains='no parameter or module named')
    bn = mlp(bn=True)
    fct.test_fail(lambda: HessianOperator(bn, CE, (x, y), params='1.running_mean'), contains='no parameter or module named')
    fct.test_fail(lambda: HessianOperator(model, CE, (x, y), params=other[2]), contains='not part of the model')
    fct.test_fail(lambda: HessianOperator(model, CE, (x, y), params=[3]), contains='parameters, modules or names')
    fct.test_fail(lambda: HessianOperator(model, CE, (x, y), params=[]), contains='selects no parameter')
    fct.test_fail(lambda: HessianOperator(model, CE, (x, y), params=model[1]), contains='selects no parameter')  # Tanh: no params
    fct.test_fail(lambda: HessianOperator(model, CE, (x, y), mode='fast'), contains="'auto', 'fwd' or 'rev'")
    model.requires_grad_(False)
    fct.test_fail(lambda: HessianOperator(model, CE, (x, y)), contains='no parameter that requires grad')

def test_to_dense_too_large(small_op):
    op, n = small_op, small_op.num_params
    with pytest.raises(MemoryError) as e: op.to_dense(max_bytes=1000)
    assert 'MiB' in str(e.value) and 'max_dense_bytes' in str(e.value)
    fct.test_eq(op.num_matvecs, 0)                      # refused before computing anything
    big = HessianOperator(op.model, CE, op.data[0], max_dense_bytes=8 * n * n - 1)
    fct.test_fail(big.to_dense, contains='to_dense() needs')
    fct.test_eq(HessianOperator(op.model, CE, op.data[0], max_dense_bytes=8 * n * n).to_dense().shape, (n, n))


# ---------------------------------------------------------------- small operators
def test_dense_operator():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=F64); A = A + A.T
    op = as_operator(A)
    assert isinstance(op, DenseOperator) and as_operator(op) is op
    v = torch.randn(6, generator=g, dtype=F64)
    close(op @ v, A @ v, tol=1e-15)
    close(op.to_dense(), A, tol=0)
    fct.test_fail(lambda: DenseOperator(torch.zeros(3, 4)), contains='square')
    fct.test_fail(lambda: as_operator([[1.]]), contains='linear operator')


# ---------------------------------------------------------------- properties (hypothesis)
@settings(max_examples=10, deadline=None)
@given(hid=st.integers(1, 5), depth=st.integers(1, 2), n=st.integers(1, 9), seed=st.integers(0, 2**16),
       mode=st.sampled_from(['fwd', 'rev']))
def test_matvec_symmetric_linear_and_modes_agree(hid, depth, n, seed, mode):
    torch.manual_seed(seed)
    layers, d = [], 3
    for _ in range(depth): layers += [nn.Linear(d, hid), nn.Tanh()]; d = hid
    model = nn.Sequential(*layers, nn.Linear(d, 2)).double()
    x, y = torch.randn(n, 3, dtype=F64), torch.randint(0, 2, (n,))
    op = HessianOperator(model, CE, (x, y), mode=mode)
    other = HessianOperator(model, CE, (x, y), mode='rev' if mode == 'fwd' else 'fwd')
    v, w = rand(op.num_params, seed=seed), rand(op.num_params, seed=seed + 1)
    Hv, Hw = op @ v, op @ w
    scale = Hv.norm() * w.norm() + Hw.norm() * v.norm() + 1e-300
    assert abs(w @ Hv - v @ Hw) <= 1e-12 * scale                         # symmetry
    close(op @ (2 * v - 3 * w), 2 * Hv - 3 * Hw, tol=1e-12)              # linearity
    close(other @ v, Hv, tol=1e-11)                                      # fwd == rev
    close(op.matmat(torch.stack([v, w], 1)), torch.stack([Hv, Hw], 1), tol=1e-12)


def test_at_given_parameters_without_writing_them():
    "`at=`: the Hessian at other parameter values (flat or per tensor), exact, with the model untouched; `validate=False`."
    m = cnn()
    x, y = make_data('cnn')
    names = ['4.weight', '4.bias']
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    g = torch.Generator().manual_seed(3)
    other = {n: before[n] + 0.3 * torch.randn(before[n].shape, generator=g, dtype=F64) for n in names}
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        for n in names: m2.get_parameter(n).copy_(other[n])
    H_ref, g_ref, l_ref = reference(m2, CE, [(x, y)], names)
    for at in (other, [other[n] for n in names], torch.cat([other[n].reshape(-1) for n in names])):
        op = HessianOperator(m, CE, (x, y), names, at=at, validate=False)
        assert torch.allclose(op.to_dense(), H_ref, rtol=1e-10, atol=1e-12)
        assert torch.allclose(op.gradient(), g_ref, rtol=1e-10, atol=1e-12)
        assert torch.allclose(op.loss(), l_ref, rtol=1e-12)
        v = torch.randn(op.num_params, generator=g, dtype=F64)
        assert torch.allclose(op.matvec(v), H_ref @ v, rtol=1e-10, atol=1e-12)
        assert torch.allclose(op.matvec(v), H_ref @ v, rtol=1e-10, atol=1e-12)  # again: no graph kept for the model's values
    for n, p in m.named_parameters(): assert torch.equal(p, before[n])
    # the model's own values are not the ones used
    assert not torch.allclose(HessianOperator(m, CE, (x, y), names).to_dense(), H_ref)
    fct.test_fail(lambda: HessianOperator(m, CE, (x, y), names, at=[other['4.weight']]), contains='one per parameter')
    # validate=False skips the checking forward pass: a NaN loss is then only found by the products
    xn = x.clone(); xn[0] = float('nan')
    fct.test_fail(lambda: HessianOperator(m, CE, (xn, y), names), contains='NaN')
    op = HessianOperator(m, CE, (xn, y), names, validate=False)
    fct.test_eq(op.num_samples, len(x))
    fct.test_fail(lambda: op.gradient(), contains='NaN')  # the non-finite gradient sends it back to the losses


@pytest.mark.parametrize('fwd_over_rev, expect', [(0.5, 'fwd'), (0.95, 'rev'), (1.0, 'rev'), (1.5, 'rev')])
def test_auto_mode_keeps_fwd_only_when_clearly_faster(monkeypatch, fwd_over_rev, expect):
    "mode='auto' picks forward-over-reverse only when it is > 10% faster: a near tie goes to 'rev', not to timing noise."
    x, y = make_data('mlp', n=12)
    model = mlp()
    H, _, _ = reference(model, CE, [(x, y)])
    def fake_time(self, fn, *args):  # the timings `auto` compares, made up: rev 1 s, fwd `fwd_over_rev` s
        return fn(*args), (1.0 if fn.__name__.startswith('_hvp_batch_rev') else fwd_over_rev)
    monkeypatch.setattr(HessianOperator, '_time', fake_time)
    op = HessianOperator(model, CE, (x, y))
    v = rand(H.shape[0])
    close(op.matvec(v), H @ v)
    fct.test_eq(op._auto[False], expect)
    close(op.matvec(v), H @ v)  # and the chosen mode computes the same product


# ---------------------------------------------------------------- review fixes (session 4)
class _Partial(nn.Module):
    "A model with an unused trainable parameter (`skip`) and a plain attribute the loss depends on (`temperature`)."
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.a, self.skip, self.temperature = nn.Linear(4, 3), nn.Linear(4, 3), 1.0
    def forward(self, x): return self.a(x) / self.temperature


@pytest.mark.parametrize('mode', ['fwd', 'rev', 'auto'])
def test_unused_parameters_and_zero_hessian(mode):
    "A parameter the loss never uses has zero rows and columns; a loss linear in the parameters has H = 0 (every mode)."
    m = _Partial().double()
    x, y = make_data('mlp', n=10)
    H_ref, g_ref, _ = reference(m, CE, [(x, y)])
    op = HessianOperator(m, CE, (x, y), mode=mode)
    close(op.to_dense(), H_ref); close(op.matmat(rand(op.num_params, 3)), H_ref @ rand(op.num_params, 3))
    close(op.gradient(), g_ref)
    fct.test_eq(op.to_dense()[15:].abs().max().item(), 0.)  # skip.weight, skip.bias
    lin = nn.Linear(4, 3).double()
    op = HessianOperator(lin, lambda pred, y: pred.mean(), (x, y), mode=mode)
    for out in (op.matvec(rand(op.num_params)), op.matmat(rand(op.num_params, 2)), op.to_dense()):
        fct.test_eq(out.abs().max().item(), 0.)
    op = HessianOperator(lin, lambda pred, y: pred.mean(), (x, y), params=[lin.bias], mode=mode)  # loss - const in bias
    fct.test_eq(op.matvec(rand(3)).abs().max().item(), 0.)


@pytest.mark.parametrize('mode', ['rev', 'auto'])
def test_kept_graph_sees_plain_attributes(mode):
    "The kept gradient graph is rebuilt when a plain attribute the forward reads (a temperature) changes."
    m = _Partial().double()
    x, y = make_data('mlp', n=10)
    op = HessianOperator(m, CE, (x, y), mode=mode)
    v = rand(op.num_params)
    op.matvec(v)
    m.temperature = 0.25
    close(op.matvec(v), reference(m, CE, [(x, y)])[0] @ v)


def test_to_dense_at_given_values_across_modules():
    "`at=` with parameters of several modules: the dense blocks hold the earlier modules at the given values too."
    m = mlp()
    x, y = make_data('mlp')
    g = torch.Generator().manual_seed(5)
    at = [p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=F64) for p in m.parameters()]
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        for p, a in zip(m2.parameters(), at): p.copy_(a)
    H_ref = reference(m2, CE, [(x, y)])[0]
    for mode in ('fwd', 'rev'): close(HessianOperator(m, CE, (x, y), at=at, mode=mode).to_dense(), H_ref)


def test_train_mode_operator_leaves_a_pending_backward_intact():
    "eval_mode=False between a forward and its backward: no parameter is written, so the backward still runs."
    m = mlp(bn=True).train()
    x, y = make_data('mlp')
    loss = CE(m(x), y)
    versions = [p._version for p in m.parameters()]
    op = HessianOperator(m, CE, (x, y), eval_mode=False)
    op.matvec(rand(op.num_params)); op.gradient()
    fct.test_eq([p._version for p in m.parameters()], versions)
    loss.backward()


def test_autocast_region_does_not_lower_the_precision():
    m = mlp().float()
    x, y = make_data('mlp')
    op = HessianOperator(m, CE, (x.float(), y))
    v = rand(op.num_params, dtype=torch.float32)
    ref = op.matvec(v)
    with torch.autocast('cpu', dtype=torch.bfloat16): out = op.matvec(v)
    fct.test_eq(out.dtype, torch.float32)
    close(out, ref, tol=1e-6)


def test_fastai_training_loader_without_augmentation_or_rng_trace():
    "A fastai training loader with a training-only augmentation: the Hessian of the clean items, the same every sweep."
    from fastai.data.all import Transform, Datasets
    class Noise(Transform):
        split_idx, order = 0, 90
        def encodes(self, x:torch.Tensor): return x + 0.5 * torch.randn_like(x) if x.is_floating_point() else x
    x, y = make_data('mlp', n=40)
    dsets = Datasets(list(range(40)), [[lambda i: x[i]], [lambda i: y[i]]], splits=(list(range(30)), list(range(30, 40))))
    dls = dsets.dataloaders(bs=8, after_batch=[Noise()], device='cpu', num_workers=0)
    m = mlp()
    split = dls.train.after_batch.split_idx, dls.train.dataset.split_idx
    op = HessianOperator(m, CE, dls.train)
    state = torch.get_rng_state()
    close(op.to_dense(), reference(m, CE, [(x[:30], y[:30])])[0])
    fct.test_eq(torch.get_rng_state(), state)
    op.check_determinism()
    fct.test_eq((dls.train.after_batch.split_idx, dls.train.dataset.split_idx), split)  # the training loader's pipelines as they were
    # a torch DataLoader draws a base seed on every iteration: restored too
    op = HessianOperator(m, CE, DataLoader(TensorDataset(x, y), batch_size=16))
    state = torch.get_rng_state(); op.matvec(rand(op.num_params)); fct.test_eq(torch.get_rng_state(), state)
    # a sweep abandoned midway (an error in a product, kept alive by a traceback) leaves the pipelines as they were
    op = HessianOperator(m, CE, dls.train)
    sweep = op._batches(); next(sweep)
    fct.test_eq((dls.train.after_batch.split_idx, dls.train.dataset.split_idx), split)
    fct.test_eq(torch.get_rng_state(), state)


def test_empty_data_without_validation_pass():
    x, y = make_data('mlp')
    for data in ((x[:0], y[:0]), [], iter([])):
        fct.test_fail(lambda: HessianOperator(mlp(), CE, data, validate=False), contains='data is empty')


def test_dense_operator_refuses_a_non_symmetric_matrix():
    fct.test_fail(lambda: DenseOperator(torch.tensor([[2., 1.], [0., 3.]])), contains='not symmetric')
    A = torch.randn(5, 5, dtype=torch.float32); A = A + A.T
    DenseOperator(A + 1e-6 * torch.randn(5, 5))  # round-off of a computed Hessian passes
    B = torch.eye(1100, dtype=F64); B[1050, 3] = 1.  # checked by blocks of 1024 rows: the asymmetry is in the second block
    fct.test_fail(lambda: DenseOperator(B), contains='not symmetric')


def test_input_dtype_mismatch_names_both_dtypes():
    x, y = make_data('mlp')
    fct.test_fail(lambda: HessianOperator(mlp(), CE, (x.float(), y)), contains='inputs are torch.float32 but the parameters are torch.float64')
    with pytest.raises(RuntimeError, match='inputs are torch.float32'): HessianOperator(mlp(), CE, (x.float(), y))


def test_params_of_the_wrong_type():
    for bad in (3, 2.5, nn.Linear):
        fct.test_fail(lambda: HessianOperator(mlp(), CE, make_data('mlp'), params=bad), contains='must be parameters, modules or names')



class _GCN(nn.Module):
    "A sparse adjacency as a buffer and as a plain attribute, and a call counter the forward pass increments."
    def __init__(self, adj):
        super().__init__(); torch.manual_seed(0)
        self.register_buffer('adj', adj); self.adj_attr = adj.to_sparse_csr(); self.lin = nn.Linear(5, 3).double()
        self.n_calls = 0
    def forward(self, x):
        self.n_calls += 1
        return torch.sparse.mm(self.adj, self.lin(x)) + self.adj_attr.to_dense() @ self.lin(x)


def test_sparse_tensors_and_a_call_counter():
    "Sparse buffers/attributes are compared without torch.equal's dense-only path; a forward-pass counter does not defeat the kept graph."
    g = torch.Generator().manual_seed(0)
    A = torch.sparse_coo_tensor(torch.randint(0, 20, (2, 60), generator=g), torch.ones(60, dtype=F64), (20, 20)).coalesce()
    m = _GCN(A)
    x, y = torch.randn(20, 5, generator=g, dtype=F64), torch.randint(0, 3, (20,), generator=g)
    with preserved_state(m): pass
    HessianOperator(m, CE, [(x, y), (x, y)], eval_mode=False, mode='rev').matvec(rand(18))
    op = HessianOperator(m, CE, (x, y), mode='rev')
    v = rand(op.num_params)
    n0 = m.n_calls
    ref = op.matvec(v)
    for _ in range(3): close(op.matvec(v), ref, tol=0.)
    fct.test_eq(m.n_calls - n0, 1)  # one forward pass built the graph; the next products reused it
    close(ref, HessianOperator(m, CE, (x, y), mode='fwd').matvec(v))  # (deepcopy, which the dense reference needs, refuses CSR)


def test_dtype_hint_only_for_dtype_errors():
    class Reshaping(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(4, 3)
        def forward(self, x): return self.lin(x.float()).view(-1, 7)  # casts its input itself, fails for another reason
    x, y = make_data('mlp')
    with pytest.raises(RuntimeError, match='is invalid for input of size') as e: HessianOperator(Reshaping(), CE, (x, y))
    assert 'parameters are' not in str(e.value)


def test_the_wrapper_itself_selects_the_wrapped_model():
    from fastsprkd.core import select_unwrapped_parameters
    m = mlp()
    w = nn.DataParallel(m)
    for sel in (w, [w], 'module', m):
        fct.test_eq(select_unwrapped_parameters(w, sel), [n for n, _ in m.named_parameters()])
