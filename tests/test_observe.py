"Observer callbacks: invariance of training, values against dense float64 Hessians, epoch-table columns, fastai integration."
import math, random, warnings
from functools import partial
import numpy as np
import pytest, torch
from torch import nn
from torch.func import functional_call
import fastcore.test as fct
from fastai.basics import Learner, Callback, SGD, Adam, CrossEntropyLossFlat, accuracy, set_seed
from fastai.callback.core import CancelStepException
from fastai.callback.training import GradientClip, GradientAccumulation
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import lr_find  # noqa: F401 (patches Learner.lr_find)
from fastsprkd.data import tensor_dls, digits_dls
from fastsprkd.callback.observe import HessianSpectrumCallback, SharpnessCallback
from conftest import DEVICES

# ---------------------------------------------------------------- helpers
def tiny_data(device='cpu', bs=16, n=48, n_train=32, seed=0):
    "A float64 3-class problem in 4 dimensions: fastai DataLoaders and the training tensors."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    tr, va = torch.arange(n_train), torch.arange(n_train, n)
    return tensor_dls(x, y, tr, va, bs=bs, device=device, num_workers=0), x[tr], y[tr]

def tiny_mlp(device='cpu'):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().to(device)

def ce64(pred, targ):
    "Cross-entropy computed in the model's float64; the value handed to fastai is float32 (its Recorder's running loss is)."
    # fastai's CrossEntropyLossFlat casts float64 logits to float32 (TensorBase), which limits Hessians to ~1e-8 accuracy;
    # casting only the final scalar keeps every derivative exact in float64
    return nn.functional.cross_entropy(pred, targ).float()

def flat_params(model): return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

def dense(model, loss_func, x, y, theta=None, names=None):
    "Dense Hessian and gradient (torch.func, float64) of loss_func(model(x), y) w.r.t. the parameters `names` at `theta`."
    named = dict(model.named_parameters())
    names = names or list(named)
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    fixed = {n: p.detach() for n, p in named.items() if n not in names}
    theta = torch.cat([named[n].detach().reshape(-1) for n in names]) if theta is None else theta
    def f(v):
        ps = {n: c.reshape(s) for n, c, s in zip(names, v.split(sizes), shapes)}
        return loss_func(functional_call(model, {**fixed, **ps}, (x,)), y)
    return torch.func.hessian(f)(theta), torch.func.grad(f)(theta)

class StepSpy(Callback):
    "Records, for every optimizer step, the parameters before it and the batches whose gradients it uses."
    order = SharpnessCallback.order + 1
    def before_fit(self): self.before, self.batches, self.pending, self.after = [], [], [], []
    def after_backward(self): self.pending.append((self.learn.xb[0], self.learn.yb[0]))
    def before_step(self): self.before.append(flat_params(self.learn.model).clone())
    def after_step(self):
        self.batches.append(self.pending); self.pending = []
        self.after.append(flat_params(self.learn.model).clone())

def quiet_fit(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit(*args, **kwargs)

# ---------------------------------------------------------------- invariance
def digits_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10))

def train(opt_func, cbs, device='cpu', extra=(), fp16=False):
    "Two seeded epochs on 128 digits; returns the state dict, the recorded losses and the global random states after."
    set_seed(0, reproducible=True)
    dls = digits_dls(bs=32, n_train=128, device=device, num_workers=0)
    torch.manual_seed(1)
    model = digits_net()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=opt_func, metrics=accuracy, cbs=list(extra) + list(cbs))
    if fp16: learn.to_fp16()
    quiet_fit(learn, 2, 1e-2)
    state = {k: v.detach().clone().cpu() for k, v in learn.model.state_dict().items()}
    return state, learn.recorder.losses, (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])

OPTS = dict(sgd=partial(SGD, mom=0.9), adam=Adam)

CHEAP = dict(max_matvecs=20, trace_matvecs=6, mode='rev')  # invariance only: accuracy does not matter
quiet_eigsh = pytest.mark.filterwarnings('ignore:HessianSpectrumCallback')

@quiet_eigsh
@pytest.mark.parametrize('opt', list(OPTS))
def test_training_is_bit_identical(opt):
    ref, losses, rng = train(OPTS[opt], [])
    spec = HessianSpectrumCallback(every=3, at_epoch_end=True, n_probe=64, **CHEAP)
    sharp = SharpnessCallback()
    got, losses2, rng2 = train(OPTS[opt], [spec, sharp])
    fct.test_eq([r['step'] for r in spec.history], [3, 4, 6, 8])  # 4 steps per epoch; at each epoch end too
    fct.test_eq(len(sharp.history), 8)
    for k in ref: assert torch.equal(ref[k], got[k]), k
    fct.test_eq([float(l) for l in losses], [float(l) for l in losses2])
    assert torch.equal(rng[0], rng2[0]) and rng[1] == rng2[1] and np.array_equal(rng[2], rng2[2])

@quiet_eigsh
@pytest.mark.parametrize('device', DEVICES)
def test_bit_identical_with_clip_and_accumulation(device):
    extra = lambda: [GradientClip(0.1), GradientAccumulation(64)]
    fp16 = device == 'cuda'  # MixedPrecision needs CUDA
    ref, _, _ = train(Adam, [], device, extra(), fp16)
    got, _, _ = train(Adam, [HessianSpectrumCallback(every=2, at_epoch_end=True, n_probe=64, **CHEAP), SharpnessCallback()],
                      device, extra(), fp16)
    for k in ref: assert torch.equal(ref[k], got[k]), k

# ---------------------------------------------------------------- values against dense float64 references
@pytest.mark.parametrize('device', DEVICES)
def test_spectrum_matches_dense(device):
    dls, x, y = tiny_data(device)
    lf = ce64
    n = 43
    cb = HessianSpectrumCallback(k=4, n_probe=20, tol=1e-10, max_matvecs=200, trace_matvecs=3 * n, mode='rev', at_epoch_end=True)  # Hutch++ with 3n products is exact
    learn = Learner(dls, tiny_mlp(device), loss_func=lf, opt_func=SGD, cbs=cb)
    quiet_fit(learn, 2, 0.5)
    fct.test_eq(len(cb.history), 2)
    px, py = cb.probe[0]
    fct.test_eq(px.shape, (20, 4))
    assert all((x.to(device) == r).all(1).any() for r in px)  # the probe items are training items
    H, _ = dense(learn.model, lf, px, py)
    ev = torch.linalg.eigvalsh(H)
    row = cb.history[-1]
    fct.test_close(row['lambda_max'], ev[-1].item(), eps=1e-8)
    fct.test_close(row['lambda_min'], ev[0].item(), eps=1e-8)
    fct.test_close(row['eigenvalues'], torch.cat([ev[:2], ev[-2:]]).tolist(), eps=1e-8)
    fct.test_close(row['trace'], H.trace().item(), eps=1e-8)
    fct.test_eq(row['stability_threshold'], 2 / 0.5)
    fct.test_eq(row['step'], 4)
    assert row['converged'] and row['num_matvecs'] > 0

def test_spectrum_subset_and_given_data():
    dls, x, y = tiny_data()
    lf = ce64
    model = tiny_mlp()
    cb = HessianSpectrumCallback(every=1, at_epoch_end=False, data=(x[:10], y[:10]), params=model[2], trace=False,
                                 tol=1e-10, max_matvecs=100)
    learn = Learner(dls, model, loss_func=lf, opt_func=Adam, cbs=cb)
    quiet_fit(learn, 1, 1e-2)
    fct.test_eq([r['step'] for r in cb.history], [1, 2])
    H, _ = dense(model, lf, x[:10], y[:10], names=['2.weight', '2.bias'])
    ev = torch.linalg.eigvalsh(H)
    fct.test_close([cb.history[-1]['lambda_min'], cb.history[-1]['lambda_max']], [ev[0].item(), ev[-1].item()], eps=1e-8)
    assert cb.history[-1]['trace'] is None and cb.history[-1]['stability_threshold'] is None  # Adam: no edge of stability

@pytest.mark.parametrize('opt', list(OPTS))
def test_sharpness_matches_dense(opt):
    dls, x, y = tiny_data()
    lf = ce64
    cb, spy = SharpnessCallback(keep_tensors=True), StepSpy()
    learn = Learner(dls, tiny_mlp(), loss_func=lf, opt_func=OPTS[opt], cbs=[cb, spy])
    quiet_fit(learn, 2, 0.1)
    fct.test_eq(len(cb.history), 4)
    fct.test_eq(len(spy.before), 4)
    for row, before, after, batches in zip(cb.history, spy.before, spy.after, spy.batches):
        (xb, yb), = batches
        H, g = dense(learn.model, lf, xb, yb, theta=before)
        u = after - before
        assert torch.equal(row['update'], u)
        fct.test_close(row['grad'], g, eps=1e-12)
        fct.test_close(row['dir_sharpness'], (u @ H @ u).item(), eps=1e-14)
        fct.test_close(row['grad_corr'], (g @ u).item(), eps=1e-14)
        fct.test_close(row['dir_sharpness_normalized'], (u @ H @ u / (u @ u)).item(), eps=1e-10)
        fct.test_close(row['grad_corr_normalized'], (g @ u / (g.norm() * u.norm())).item(), eps=1e-10)
        fct.test_close(row['taylor_change'], (g @ u + u @ H @ u / 2).item(), eps=1e-14)
        if opt == 'sgd' and row['step'] == 1: fct.test_close(u, -0.1 * g, eps=1e-12)  # first momentum step: −lr·g

def test_sharpness_with_gradient_clip():
    dls, x, y = tiny_data()
    lf = ce64
    cb, spy = SharpnessCallback(keep_tensors=True), StepSpy()
    learn = Learner(dls, tiny_mlp(), loss_func=lf, opt_func=SGD, cbs=[GradientClip(0.01), cb, spy])
    quiet_fit(learn, 1, 1.)
    for row, before, ((xb, yb),) in zip(cb.history, spy.before, spy.batches):
        _, g = dense(learn.model, lf, xb, yb, theta=before)
        assert g.norm() > 0.1  # clipping is active
        fct.test_close(row['grad'], g * 0.01 / (g.norm() + 1e-6), eps=1e-12)  # the clipped gradient, as the step used it
        fct.test_close(row['update'], -row['grad'], eps=1e-12)
        fct.test_close(row['grad_corr_normalized'], -1., eps=1e-10)

def test_sharpness_with_gradient_accumulation():
    dls, x, y = tiny_data(bs=8)
    lf = ce64
    cb, spy = SharpnessCallback(keep_tensors=True), StepSpy()
    learn = Learner(dls, tiny_mlp(), loss_func=lf, opt_func=SGD, cbs=[GradientAccumulation(16), cb, spy])
    quiet_fit(learn, 1, 0.1)
    fct.test_eq(len(spy.before), 2)  # 4 batches of 8, one step per 16 items
    fct.test_eq(len(cb.history), 2)
    for row, before, after, batches in zip(cb.history, spy.before, spy.after, spy.batches):
        fct.test_eq(row['num_batches'], 2)
        xb, yb = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        H, g = dense(learn.model, lf, xb, yb, theta=before)  # the mean loss over the accumulated batches
        u = after - before
        fct.test_close(row['grad'], g, eps=1e-12)
        fct.test_close(row['dir_sharpness'], (u @ H @ u).item(), eps=1e-14)

# ---------------------------------------------------------------- fastai integration
COLS = ['lambda_max', 'lambda_min', 'trace', 'grad_corr', 'dir_sharpness']

def test_columns_appear_and_disappear():
    dls, _, _ = tiny_data()
    learn = Learner(dls, tiny_mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    quiet_fit(learn, 1, 1e-2)
    plain = list(learn.recorder.metric_names)
    spec, sharp = HessianSpectrumCallback(n_probe=16, at_epoch_end=True), SharpnessCallback()
    quiet_fit(learn, 2, 1e-2, cbs=[spec, sharp])
    names = list(learn.recorder.metric_names)
    for c in COLS: fct.test_eq(names.count(c), 1)
    fct.test_eq([m.name for m in learn.metrics], ['accuracy'])
    i = names.index('lambda_max') - 1  # recorder.values omit the epoch
    fct.test_eq([v[i] for v in learn.recorder.values], [r['lambda_max'] for r in spec.history])
    j = names.index('dir_sharpness') - 1
    fct.test_close(learn.recorder.values[-1][j], np.mean([r['dir_sharpness'] for r in sharp.history if r['epoch'] == 1]))
    quiet_fit(learn, 1, 1e-2)
    fct.test_eq(list(learn.recorder.metric_names), plain)
    # attached for good: two fits, no duplicates, rows continue
    learn.add_cbs([spec, sharp])
    quiet_fit(learn, 1, 1e-2); quiet_fit(learn, 1, 1e-2)
    for c in COLS: fct.test_eq(list(learn.recorder.metric_names).count(c), 1)
    fct.test_eq([r['fit'] for r in spec.history], [0, 0, 1, 2])
    fct.test_eq([r['step'] for r in spec.history], [2, 4, 6, 8])

class Boom(Callback):
    def after_batch(self): raise RuntimeError('boom')

def test_columns_clean_after_an_exception():
    dls, _, _ = tiny_data()
    learn = Learner(dls, tiny_mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=SharpnessCallback())
    with pytest.raises(RuntimeError): quiet_fit(learn, 1, 1e-2, cbs=Boom())
    quiet_fit(learn, 1, 1e-2)
    fct.test_eq(list(learn.recorder.metric_names).count('grad_corr'), 1)
    fct.test_eq([m.name for m in learn.metrics], ['accuracy'])
    learn.remove_cbs(learn.sharpness)
    quiet_fit(learn, 1, 1e-2)
    assert 'grad_corr' not in learn.recorder.metric_names

def test_off_during_lr_find_get_preds_validate():
    dls, _, _ = tiny_data()
    learn = Learner(dls, tiny_mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    learn.track_hessian(every=1, n_probe=16).track_sharpness()
    with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=6, show_plot=False)
    fct.test_eq(learn.hessian_spectrum.history, [])
    fct.test_eq(learn.sharpness.history, [])
    with learn.no_bar():
        preds, targs = learn.get_preds()
        res = learn.validate()
    fct.test_eq(len(res), 2)  # valid loss and accuracy, no observer columns
    fct.test_eq(learn.hessian_spectrum.history, [])
    quiet_fit(learn, 1, 1e-2)
    fct.test_eq(len(learn.sharpness.history), 2)
    fct.test_eq([r['step'] for r in learn.hessian_spectrum.history], [1, 2])
    fct.test_eq([m.name for m in learn.metrics], ['accuracy'])

def test_plots_and_conveniences():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    dls, _, _ = tiny_data()
    learn = Learner(dls, tiny_mlp(), loss_func=CrossEntropyLossFlat(), opt_func=SGD)
    assert learn.track_hessian(every=1, n_probe=16).track_sharpness() is learn
    quiet_fit(learn, 1, 0.1)
    ax = learn.hessian_spectrum.plot(show_trace=True)
    labels = [l.get_label() for l in ax.get_lines()]
    assert 'λ_max' in labels and 'λ_min' in labels and any('edge of stability' in l for l in labels)
    assert learn.sharpness.plot(ax=plt.gca()) is not None
    plt.close('all')

def test_bad_arguments():
    with pytest.raises(ValueError, match='nothing to measure'): HessianSpectrumCallback(at_epoch_end=False)
    with pytest.raises(ValueError, match='k ≥ 2'): HessianSpectrumCallback(k=1)
    with pytest.raises(ValueError, match='every'): HessianSpectrumCallback(every=0)
    with pytest.raises(ValueError, match='every'): SharpnessCallback(every=0)
    with pytest.raises(ValueError, match='which'): HessianSpectrumCallback(which='XX')
    with pytest.raises(ValueError, match='empty'): HessianSpectrumCallback().plot()

# ---------------------------------------------------------------- defaults: the time-budget schedule
class FakeClock:
    "A clock that only moves when told: training batches and measurements advance it by fixed amounts."
    def __init__(self): self.t = 0.
    def __call__(self): return self.t

class Tick(Callback):
    "Each training batch takes 1 fake second."
    def __init__(self, clock): self.clock = clock
    def before_batch(self):
        if self.training: self.clock.t += 1.

class CostlySpectrum(HessianSpectrumCallback):
    "Each measurement takes `cost` fake seconds."
    def __init__(self, cost, **kwargs): super().__init__(**kwargs); self.cost = cost
    def _operator(self):
        self.clock.t += self.cost
        return super()._operator()

def test_default_schedule_is_a_time_budget():
    cb = HessianSpectrumCallback()
    fct.test_eq((cb.budget, cb.every, cb.at_epoch_end), (0.1, None, False))
    fct.test_eq(HessianSpectrumCallback(every=5).budget, None)  # a fixed schedule replaces the budget...
    fct.test_eq(HessianSpectrumCallback(every=5, budget=0.2).budget, 0.2)  # ...unless both are asked for
    with pytest.raises(ValueError, match='budget'): HessianSpectrumCallback(budget=-1)

def test_budget_schedule_with_a_fake_clock():
    dls, _, _ = tiny_data(bs=8)  # 4 steps per epoch
    clock = FakeClock()
    cb = CostlySpectrum(3., budget=1., clock=clock, n_probe=8, trace=False, max_matvecs=10)
    learn = Learner(dls, tiny_mlp(), loss_func=ce64, opt_func=SGD, cbs=[cb, Tick(clock)])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        quiet_fit(learn, 3, 0.1)
        # fit 0: no cost known yet, so the first measurement is the forced one at the end of epoch 0 (step 4, clock 4→7);
        # then one when spent + 3 ≤ 1.0 × (clock − spent) (the fit's budget) and 3 ≤ 1.0 × the other time since the last
        # measurement: not at step 6 (whole fit: 6 ≤ 6, but only 2 s since the last), at step 7 (clock 10), step 10 (clock 16)
        fct.test_eq([r['step'] for r in cb.history], [4, 7, 10])
        fct.test_eq([r['seconds'] for r in cb.history], [3.] * 3)
        fct.test_eq(cb._spent, 9.)
        # fit 1: the budget restarts and the cost is known: step 15 (3 s of the fit ≥ 0 + 3), step 18 (9 s − 3 ≥ 3 + 3)
        quiet_fit(learn, 2, 0.1)
    fct.test_eq([r['step'] for r in cb.history if r['fit'] == 1], [15, 18])
    # a budget below the cost of a measurement: only the forced one per fit, at the end of its first epoch
    clock2 = FakeClock()
    cb2 = CostlySpectrum(3., budget=0.1, clock=clock2, n_probe=8, trace=False, max_matvecs=10)
    learn2 = Learner(dls, tiny_mlp(), loss_func=ce64, opt_func=SGD, cbs=[cb2, Tick(clock2)])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        quiet_fit(learn2, 3, 0.1); quiet_fit(learn2, 2, 0.1)
    fct.test_eq([r['step'] for r in cb2.history], [4, 16])

@quiet_eigsh
@pytest.mark.parametrize('opt', list(OPTS))
def test_bit_identical_with_the_defaults(opt):
    ref, losses, rng = train(OPTS[opt], [])
    spec, sharp = HessianSpectrumCallback(), SharpnessCallback()
    got, losses2, rng2 = train(OPTS[opt], [spec, sharp])
    assert len(spec.history) >= 1 and spec.history[0]['step'] == 4  # at least the forced measurement after the first epoch
    for k in ref: assert torch.equal(ref[k], got[k]), k
    fct.test_eq([float(l) for l in losses], [float(l) for l in losses2])
    assert torch.equal(rng[0], rng2[0]) and rng[1] == rng2[1] and np.array_equal(rng[2], rng2[2])

# ---------------------------------------------------------------- issue 9: parameter sets, precision, BatchNorm
def head_splitter(m): return [list(m[0].parameters()), list(m[2].parameters())]

class UnfreezeAt(Callback):
    "Unfreezes the learner after `n` optimizer steps of the fit, inside the fit."
    order = 0
    def __init__(self, n): self.n = n
    def before_fit(self): self.count = 0
    def after_step(self):
        self.count += 1
        if self.count == self.n: self.learn.unfreeze()

def test_parameter_set_changes():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    dls, x, y = tiny_data()
    model = tiny_mlp()
    exact = dict(tol=1e-10, max_matvecs=200, ncv=None)
    spec = HessianSpectrumCallback(at_epoch_end=True, data=(x[:12], y[:12]), k=2, trace=True, trace_matvecs=3 * 43, **exact)
    sharp = SharpnessCallback()
    learn = Learner(dls, model, loss_func=ce64, opt_func=SGD, splitter=head_splitter, cbs=[spec, sharp])
    learn.freeze()  # the body (model[0]) is frozen: curvature w.r.t. the head only
    quiet_fit(learn, 1, 0.1)
    head = ['2.weight', '2.bias']
    H, _ = dense(model, ce64, x[:12], y[:12], names=head)
    ev = torch.linalg.eigvalsh(H)
    row = spec.history[-1]
    fct.test_eq(row['n_params'], 18)
    fct.test_close([row['lambda_min'], row['lambda_max'], row['trace']], [ev[0].item(), ev[-1].item(), H.trace().item()], eps=1e-8)
    learn.unfreeze()
    quiet_fit(learn, 1, 0.1)
    H, _ = dense(model, ce64, x[:12], y[:12])
    ev = torch.linalg.eigvalsh(H)
    row2 = spec.history[-1]
    fct.test_eq(row2['n_params'], 43)
    fct.test_close([row2['lambda_min'], row2['lambda_max'], row2['trace']], [ev[0].item(), ev[-1].item(), H.trace().item()], eps=1e-8)
    assert row['params_id'] != row2['params_id']
    fct.test_eq([r['n_params'] for r in sharp.history], [18, 18, 43, 43])
    fct.test_eq(len({r['params_id'] for r in sharp.history}), 2)
    # a change inside a fit (unfrozen after its first step): the operator is rebuilt, the rows say so, the plot marks it
    learn.freeze()
    spec2 = HessianSpectrumCallback(every=1, data=(x[:12], y[:12]), trace=False, **exact)
    quiet_fit(learn, 1, 0.1, cbs=[spec2, UnfreezeAt(1)])
    fct.test_eq([r['n_params'] for r in spec2.history], [43, 43])  # unfrozen before the first measurement (both after_step)
    learn.freeze()
    spec3 = HessianSpectrumCallback(every=1, data=(x[:12], y[:12]), trace=False, **exact)
    quiet_fit(learn, 2, 0.1, cbs=[spec3, UnfreezeAt(2)])
    fct.test_eq([r['n_params'] for r in spec3.history], [18, 43, 43, 43])
    H, _ = dense(model, ce64, x[:12], y[:12])
    fct.test_close(spec3.history[-1]['lambda_max'], torch.linalg.eigvalsh(H)[-1].item(), eps=1e-8)
    ax = spec3.plot()
    marks = [l for l in ax.get_lines() if l.get_label() == 'parameter set changed']
    fct.test_eq(len(marks), 1)
    fct.test_eq(list(marks[0].get_xdata()), [2, 2])
    plt.close('all')

class BatchStatsNorm(nn.Module):
    "BatchNorm1d with the batch's own statistics, written out (torch.func.hessian of native batch_norm is not symmetric)."
    def __init__(self, n, eps=1e-5): super().__init__(); self.weight, self.bias, self.eps = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n)), eps
    def forward(self, x):
        mu, var = x.mean(0), x.var(0, unbiased=False)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias

def bn_mlp(norm=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), norm or nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()

def test_batchnorm_eval_and_train_bn():
    dls, x, y = tiny_data()
    px, py = x[:12], y[:12]
    kw = dict(at_epoch_end=True, data=(px, py), trace=False, tol=1e-10, max_matvecs=200, ncv=None)
    ev_cb, bn_cb = HessianSpectrumCallback(**kw), HessianSpectrumCallback(train_bn=True, **kw)
    model = bn_mlp()
    learn = Learner(dls, model, loss_func=ce64, opt_func=SGD, cbs=[ev_cb, bn_cb])
    quiet_fit(learn, 1, 0.1)
    model.eval()  # the default: running statistics, no Dropout
    H, _ = dense(model, ce64, px, py)
    ev = torch.linalg.eigvalsh(H)
    fct.test_close([ev_cb.history[-1]['lambda_min'], ev_cb.history[-1]['lambda_max']], [ev[0].item(), ev[-1].item()], eps=1e-8)
    # train_bn: BatchNorm with the probe batch's own statistics (a copy without running statistics), Dropout off
    ref = bn_mlp(BatchStatsNorm(6))
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if 'running' not in k and 'num_batches' not in k})
    ref.eval()
    H, _ = dense(ref, ce64, px, py)
    ev2 = torch.linalg.eigvalsh(H)
    fct.test_close([bn_cb.history[-1]['lambda_min'], bn_cb.history[-1]['lambda_max']], [ev2[0].item(), ev2[-1].item()], eps=1e-8)
    assert abs(ev2[-1] - ev[-1]) > 1e-3  # the two modes are different Hessians

def test_no_autocast_inside_measurements():
    "A measurement started inside an autocast region (bf16 on the CPU) is still computed in float32."
    _, x, y = tiny_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    lf = lambda p, t: nn.functional.cross_entropy(p, t)
    cb = HessianSpectrumCallback(every=2, data=(x[:12].float(), y[:12]), trace=True, tol=1e-6, max_matvecs=100, ncv=None)
    learn = Learner(tiny_dls32(), model, loss_func=lf, opt_func=SGD, cbs=cb)
    quiet_fit(learn, 1, 0.1)
    plain = cb.measure()
    with torch.autocast('cpu', dtype=torch.bfloat16): mixed = cb.measure()
    fct.test_close(mixed['eigenvalues'], plain['eigenvalues'], eps=1e-5)
    fct.test_close(mixed['trace'], plain['trace'], eps=1e-4)
    H, _ = dense(model.double(), lambda p, t: nn.functional.cross_entropy(p, t), x[:12], y[:12])
    fct.test_close(plain['lambda_max'], torch.linalg.eigvalsh(H)[-1].item(), eps=1e-4)

def tiny_dls32(device='cpu'):
    "`tiny_data`'s problem in float32."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64).float()
    y = torch.randint(0, 3, (48,), generator=g)
    return tensor_dls(x, y, torch.arange(32), torch.arange(32, 48), bs=16, device=device, num_workers=0)

class FakeScaler(Callback):
    "Loss scaling as `MixedPrecision` does it (scale the backward pass, unscale the gradients in `before_step`), on the CPU."
    order = MixedPrecision.order
    def before_backward(self): self.learn.loss_grad = self.loss_grad * 1024.
    def before_step(self):
        for p in self.learn.model.parameters():
            if p.grad is not None: p.grad.div_(1024.)

def test_sharpness_reads_unscaled_gradients():
    dls, x, y = tiny_data()
    cb, spy = SharpnessCallback(keep_tensors=True), StepSpy()
    learn = Learner(dls, tiny_mlp(), loss_func=ce64, opt_func=SGD, cbs=[FakeScaler(), cb, spy])
    quiet_fit(learn, 1, 0.1)
    for row, before, ((xb, yb),) in zip(cb.history, spy.before, spy.batches):
        H, g = dense(learn.model, ce64, xb, yb, theta=before)
        fct.test_close(row['grad'], g, eps=1e-12)
        fct.test_close(row['update'], -0.1 * g, eps=1e-12)
        fct.test_close(row['dir_sharpness'], (row['update'] @ H @ row['update']).item(), eps=1e-14)

@pytest.mark.parametrize('device', DEVICES)
def test_values_under_to_fp16(device):
    "With `learn.to_fp16()` (CUDA autocast + loss scaling; on the CPU fastai disables both) the spectrum is the float32 Hessian and the sharpness rows hold unscaled gradients."
    import copy
    _, x, y = tiny_data()
    dls = tiny_dls32(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(device)
    lf = lambda p, t: nn.functional.cross_entropy(p.float(), t)
    px, py = x[:12].float().to(device), y[:12].to(device)
    spec = HessianSpectrumCallback(at_epoch_end=True, data=(px, py), trace=False, tol=1e-6, max_matvecs=100, ncv=None)
    sharp, spy = SharpnessCallback(keep_tensors=True), StepSpy()
    learn = Learner(dls, model, loss_func=lf, opt_func=SGD, cbs=[spec, sharp, spy]).to_fp16(init_scale=2.**8)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # on the CPU: "CUDA is not available ... Disabling"
        quiet_fit(learn, 1, 0.1)
    ref = copy.deepcopy(model).double().cpu()
    H, _ = dense(ref, lf, px.double().cpu(), py.cpu())
    fct.test_close(spec.history[-1]['lambda_max'] / torch.linalg.eigvalsh(H)[-1].item(), 1., eps=1e-4)
    assert len(sharp.history) == len(spy.before) > 0
    for row, before, ((xb, yb),) in zip(sharp.history, spy.before, spy.batches):
        _, g64 = dense(ref, lf, xb.double().cpu(), yb.cpu(), theta=before.double().cpu())
        assert (row['grad'].double() - g64).norm() <= 1e-2 * g64.norm()  # unscaled (a scaled one is 256× larger)


# ---------------------------------------------------------------- review fixes (session 4)
class _CtrlC(Callback):
    order = 90
    def after_epoch(self): raise KeyboardInterrupt

def test_one_fit_observer_takes_its_columns_along_when_interrupted():
    "`fit(cbs=[observer])` interrupted: the callback leaves the learner and its columns leave `learn.metrics` with it."
    dls, _, _ = tiny_data()
    learn = Learner(dls, tiny_mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    with pytest.raises(KeyboardInterrupt): quiet_fit(learn, 2, 1e-2, cbs=[SharpnessCallback(), _CtrlC()])
    fct.test_eq([m.name for m in learn.metrics], ['accuracy'])
    quiet_fit(learn, 1, 1e-2)
    assert 'grad_corr' not in learn.recorder.metric_names
    obs = HessianSpectrumCallback(every=1, n_probe=16, trace=False)
    learn.add_cb(obs)
    quiet_fit(learn, 1, 1e-2)
    assert obs._op is None  # the operator (model, probe, kept graph) is not held after the fit
    learn.remove_cb(obs)
    fct.test_eq([m.name for m in learn.metrics], ['accuracy'])

class _SkipOdd(Callback):
    "Cancels every other step before the optimizer runs, as MixedPrecision does on an overflow."
    order = 10
    def before_fit(self): self.i, self.taken = 0, 0
    def before_step(self):
        self.i += 1
        if self.i % 2: raise CancelStepException()
        self.taken += 1

def test_cancelled_steps_are_not_counted():
    dls, _, _ = tiny_data(bs=8)
    spec, sh, skip = HessianSpectrumCallback(every=1, n_probe=16, trace=False), SharpnessCallback(), _SkipOdd()
    learn = Learner(dls, tiny_mlp(), loss_func=CrossEntropyLossFlat(), opt_func=SGD, cbs=[skip, spec, sh])
    quiet_fit(learn, 1, 1e-2)
    fct.test_eq((skip.i, skip.taken), (4, 2))
    fct.test_eq([r['step'] for r in spec.history], [1, 2])
    fct.test_eq([r['step'] for r in sh.history], [1, 2])
    with pytest.raises(ValueError, match='trace_matvecs must be an integer ≥ 6'): HessianSpectrumCallback(trace_matvecs=4)
