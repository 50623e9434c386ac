"Edge of stability of adaptive optimizers (fastsprkd.stability and HessianSpectrumCallback): the preconditioner read from the optimizer's state against the optimizer's own update, the preconditioned sharpness against dense float64 references after real fastai fits, and the observer's accuracy controls."
import math, warnings
from functools import partial
import pytest, torch
from torch import nn
from torch.func import functional_call
import fastcore.test as fct
from fastai.basics import Learner, SGD, Adam, RAdam, Lamb, QHAdam, RMSProp, OptimWrapper, params as fa_params
from fastai.callback.progress import ProgressCallback  # noqa: F401 (patches Learner.no_bar)
from fastsprkd.data import tensor_dls
from fastsprkd.callback.observe import HessianSpectrumCallback
from fastsprkd.stability import adam_preconditioner, preconditioned_sharpness, edge_of_stability, PreconditionedOperator

def tiny_data(n=48, n_train=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    tr, va = torch.arange(n_train), torch.arange(n_train, n)
    return tensor_dls(x, y, tr, va, bs=16, num_workers=0), x[tr], y[tr]

def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()

def ce64(pred, targ): return nn.functional.cross_entropy(pred, targ).float()  # derivatives in float64, the value fastai sees in float32

def dense_hessian(model, x, y):
    "Dense float64 Hessian of the mean cross-entropy w.r.t. all parameters, by torch.func (independent of fastsprkd)."
    named = dict(model.named_parameters())
    shapes, sizes = [p.shape for p in named.values()], [p.numel() for p in named.values()]
    def f(v):
        ps = {n: c.reshape(s) for n, c, s in zip(named, v.split(sizes), shapes)}
        return nn.functional.cross_entropy(functional_call(model, ps, (x,)), y)
    return torch.func.hessian(f)(torch.cat([p.detach().reshape(-1) for p in named.values()]))

def quiet_fit(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit(*args, **kwargs)

def splitter(m): return [fa_params(m[0]), fa_params(m[2])]

EXACT = dict(at_epoch_end=True, trace=False, tol=1e-10, max_matvecs=200, ncv=None, lambda_min_rtol=None)

# ---------------------------------------------------------------- the preconditioner against the optimizer's own update
# θ_new − θ_old = −lr_ref · D⁻¹ · direction for the step just taken, with D read from the state after it (wd = 0)
def _direction(kind, opt, p, hp, st):
    g = p.grad.double()
    if kind in ('adam', 'radam', 'lamb'): return st['grad_avg'].double() / (1 - hp['mom'] ** st['step'])
    if kind == 'qhadam': return (1 - hp['nu_1']) * g + hp['nu_1'] * st['grad_avg'].double() / (1 - hp['mom'] ** st['step'])
    if kind == 'rmsprop': return st['grad_avg'].double()
    if kind == 'torch.adam': return st['exp_avg'].double() / (1 - hp['betas'][0] ** float(st['step']))
    if kind == 'torch.rmsprop': return g  # momentum 0
    raise AssertionError(kind)

RULES = dict(adam=partial(Adam, wd=0.), radam=partial(RAdam, wd=0.), lamb=partial(Lamb, wd=0.), qhadam=partial(QHAdam, wd=0., nu_2=0.8),
             rmsprop=partial(RMSProp, mom=0.9, wd=0.),
             **{'torch.adam': lambda ps, lr: OptimWrapper(ps, opt=torch.optim.AdamW, lr=lr, weight_decay=0.),
                'torch.adam.amsgrad': lambda ps, lr: OptimWrapper(ps, opt=torch.optim.Adam, lr=lr, amsgrad=True),
                'torch.rmsprop': lambda ps, lr: OptimWrapper(ps, opt=partial(torch.optim.RMSprop, centered=True), lr=lr)})

@pytest.mark.parametrize('rule', list(RULES))
def test_preconditioner_reproduces_the_update(rule):
    model = tiny_mlp()
    groups = [list(model[0].parameters()), list(model[2].parameters())]  # two groups, two learning rates
    opt = RULES[rule](groups, lr=0.01)
    opt.set_hyper('lr', [0.002, 0.01])
    g = torch.Generator().manual_seed(1)
    ps = [p for grp in groups for p in grp]
    for t in range(8):  # RAdam is rectified from step 6 on (sqr_mom 0.99)
        for p in ps: p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        before = torch.cat([p.detach().reshape(-1).clone() for p in ps])
        opt.step()
    pre = adam_preconditioner(opt, ps)
    fct.test_eq(pre.kind, rule.replace('.amsgrad', ''))
    fct.test_eq(pre.lr, 0.01)
    fct.test_eq(pre.step, 0 if rule == 'rmsprop' else 8)  # fastai's RMSProp counts no steps
    after = torch.cat([p.detach().reshape(-1) for p in ps])
    torch_opt = getattr(opt, 'opt', None)
    dirs = []
    for i, p in enumerate(ps):
        if isinstance(torch_opt, torch.optim.Optimizer): st, hp = torch_opt.state[p], torch_opt.param_groups[0 if i < 2 else 1]
        else: st, hp = opt.state[p], opt.hypers[0 if i < 2 else 1]
        dirs.append(_direction(pre.kind, opt, p, hp, st).reshape(-1))
    want = -pre.lr * torch.cat(dirs) / pre.diag
    # LAMB's trust ratio is read at the current θ (the step computed it at θ before the step): equal to ~lr·‖step‖/‖θ‖
    fct.test_close(after - before, want, eps=2e-2 * want.abs().max().item() if rule == 'lamb' else 1e-10)
    c = {'qhadam': 2 * (1 + 0.999) / (1 + 0.999 - 2 * 0.7 * 0.999), 'rmsprop': 2 * 1.9, 'torch.rmsprop': 2.}.get(rule, 38.)
    fct.test_close(pre.threshold, c / 0.01, eps=1e-9)

def test_preconditioner_errors():
    model = tiny_mlp()
    opt = Adam(list(model.parameters()), lr=0.01)
    with pytest.raises(ValueError, match='has no .sqr_avg. in the optimizer'): adam_preconditioner(opt, list(model.parameters()))
    assert len(opt.state) == 0  # reading it added no entries to fastai's defaultdict
    other = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match='not in the optimizer'): adam_preconditioner(opt, list(other.parameters()))
    with pytest.raises(TypeError, match='not supported'): adam_preconditioner(torch.optim.Adagrad(model.parameters()), list(model.parameters()))
    assert adam_preconditioner(SGD(list(model.parameters()), lr=0.1, mom=0.9), list(model.parameters())) is None

# ---------------------------------------------------------------- against dense references after real fits
def _dense_precond(model, opt_state, x, y):
    "λ_max(P^{-1/2} H P^{-1/2}), P = diag(√v̂ + ε)·lr_ref/lr_i, built by hand from the optimizer's state."
    H = dense_hessian(model, x, y)
    P = torch.cat([d.reshape(-1) for d in opt_state])
    s = P.rsqrt()
    return torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1].item()

def test_adam_fit_matches_dense():
    dls, x, y = tiny_data()
    cb = HessianSpectrumCallback(data=(x[:20], y[:20]), **EXACT)
    learn = Learner(dls, tiny_mlp(), loss_func=ce64, opt_func=Adam, cbs=cb)
    quiet_fit(learn, 2, 1e-2)  # 4 Adam steps
    row = cb.history[-1]
    fct.test_eq(row['step'], 4)
    opt, hp = learn.opt, learn.opt.hypers[-1]
    fct.test_eq(hp['mom'], 0.9)
    P = [(opt.state[p]['sqr_avg'] / (1 - hp['sqr_mom'] ** opt.state[p]['step'])).sqrt() + hp['eps'] for p in learn.model.parameters()]
    fct.test_close(row['precond_sharpness'], _dense_precond(learn.model, P, x[:20], y[:20]), eps=1e-8)
    fct.test_close(row['precond_threshold'], 38 / 1e-2, eps=1e-9)
    assert row['stability_threshold'] is None and row['precond_kind'] == 'adam' and row['precond_converged']
    assert row['precond_err'] <= 1e-8 * row['precond_sharpness']

def test_discriminative_lrs_and_torch_adamw_match_dense():
    dls, x, y = tiny_data()
    opt_func = lambda ps, lr: OptimWrapper(ps, opt=torch.optim.AdamW, lr=lr, betas=(0.8, 0.95), eps=1e-6)
    cb = HessianSpectrumCallback(data=(x[:20], y[:20]), **EXACT)
    learn = Learner(dls, tiny_mlp(), loss_func=ce64, opt_func=opt_func, splitter=splitter, cbs=cb)
    quiet_fit(learn, 2, slice(1e-3, 1e-2))
    row = cb.history[-1]
    groups = learn.opt.opt.param_groups
    fct.test_eq([g['lr'] for g in groups], [1e-3, 1e-2])
    P = []
    for g in groups:
        for p in g['params']:
            st = learn.opt.opt.state[p]
            v = st['exp_avg_sq'] / (1 - 0.95 ** float(st['step']))
            P.append((v.sqrt() + 1e-6) * (1e-2 / g['lr']))  # the group's learning rate absorbed: D = P·lr_ref/lr_i
    fct.test_close(row['precond_sharpness'], _dense_precond(learn.model, P, x[:20], y[:20]), eps=1e-8)
    fct.test_close(row['precond_threshold'], 2 * 1.8 / 0.2 / 1e-2, eps=1e-9)

def test_sgd_unchanged_and_precond_off():
    dls, x, y = tiny_data()
    cb = HessianSpectrumCallback(data=(x[:20], y[:20]), **EXACT)
    learn = Learner(dls, tiny_mlp(), loss_func=ce64, opt_func=partial(SGD, mom=0.9), cbs=cb)
    quiet_fit(learn, 1, 0.1)
    row = cb.history[-1]
    fct.test_close(row['stability_threshold'], 2 * 1.9 / 0.1)
    assert row['precond_sharpness'] is None and row['precond_threshold'] is None
    cb2 = HessianSpectrumCallback(data=(x[:20], y[:20]), precond=False, **EXACT)
    learn = Learner(dls, tiny_mlp(), loss_func=ce64, opt_func=Adam, cbs=cb2)
    quiet_fit(learn, 1, 1e-2)
    assert cb2.history[-1]['precond_sharpness'] is None
    with pytest.raises(ValueError, match='precond must be'): HessianSpectrumCallback(precond='yes')
    with pytest.raises(ValueError, match='trace_rtol must be'): HessianSpectrumCallback(trace_rtol=0)

def test_unknown_optimizer_warns_or_raises():
    dls, x, y = tiny_data()
    opt_func = lambda ps, lr: OptimWrapper(ps, opt=torch.optim.Adagrad, lr=lr)
    learn = Learner(dls, tiny_mlp(), loss_func=ce64, opt_func=opt_func, cbs=HessianSpectrumCallback(data=(x[:20], y[:20]), **EXACT))
    with pytest.warns(UserWarning, match='no preconditioned sharpness'): quiet_fit(learn, 1, 1e-2)
    assert learn.hessian_spectrum.history[-1]['precond_sharpness'] is None
    learn = Learner(dls, tiny_mlp(), loss_func=ce64, opt_func=opt_func, cbs=HessianSpectrumCallback(data=(x[:20], y[:20]), precond=True, **EXACT))
    with pytest.raises(TypeError, match='Adagrad is not supported'): quiet_fit(learn, 1, 1e-2)

# ---------------------------------------------------------------- the observer's accuracy controls and plot
def test_lambda_min_relative_and_plot():
    dls, x, y = tiny_data()
    cb = HessianSpectrumCallback(data=(x[:20], y[:20]), at_epoch_end=True, trace=True, tol=1e-2, max_matvecs=60, ncv=6,
                                 lambda_min_rtol=1e-3, trace_matvecs=30, trace_rtol=0.05)
    learn = Learner(dls, tiny_mlp(), loss_func=ce64, opt_func=Adam, cbs=cb)
    quiet_fit(learn, 2, 1e-2)
    ev = torch.linalg.eigvalsh(dense_hessian(learn.model, x[:20], y[:20]))
    row = cb.history[-1]
    assert row['lambda_min_converged'] and row['lambda_min_err'] <= 1e-3 * abs(row['lambda_min'])
    assert abs(row['lambda_min'] - ev[0].item()) <= 1e-3 * abs(ev[0].item())
    assert row['trace_stderr'] is not None and row['lambda_max_err'] is not None
    import matplotlib; matplotlib.use('Agg')
    ax = cb.plot(show_trace=True)
    labels = ax.get_legend().get_texts()
    assert any('preconditioned' in t.get_text() for t in labels) and any('trace' in t.get_text() for t in labels)
