"SPRKD callbacks: teacher capture (strict saddle, convex control, invariance), student recruitment (approach, eigenstep, perturbation), Hinton KD."
import math, warnings
import pytest, torch
from torch import nn
import torch.nn.functional as F
import fastcore.test as fct
from fastai.learner import Learner
from fastai.callback.core import Callback
from fastai.optimizer import SGD, Adam
from fastai.losses import MSELossFlat, CrossEntropyLossFlat
from fastai.torch_core import set_seed
import fastai.callback.schedule  # Learner.lr_find
import fastai.callback.progress  # Learner.no_bar
from torch.func import functional_call
from fastsprkd.data import tensor_dls, digits_dls
from fastsprkd.models import DigitsCNN, DigitsMLP
from fastsprkd.saddle import SaddleBank, SaddlePoint, SaddleBankError, centre_crop, crop_params
from fastsprkd.callback.sprkd import (SaddleCaptureCallback, SaddleRecruitCallback, DistillationCallback, saddle_criterion,
                                      negative_curvature_step, hinton_kd_loss, probe_batches)
from conftest import DEVICES


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    "These models are tiny: one intra-op thread avoids OpenMP spin-waiting on a busy 2-core machine (100× slower HVPs)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fit(learn, n):
    with learn.no_bar(), learn.no_logging(): learn.fit(n)
    return learn


def saddle_dls(device='cpu', bs=16, n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.5], [-1.], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    idx = torch.arange(n)
    return tensor_dls(x, y, idx, idx, bs=bs, device=device)  # validation = training set: the loss we want to lower


def saddle_model(w=0.):
    "y = W2·W1·x; at W1 = W2 = 0 the gradient is exactly 0 and the Hessian has negative eigenvalues."
    m = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        for p in m.parameters(): p.fill_(w)
    return m


def saddle_learner(cbs=None, lr=0.1, device='cpu', model=None, opt_func=SGD, bs=16):
    return Learner(saddle_dls(device, bs), model or saddle_model(), loss_func=MSELossFlat(), opt_func=opt_func, lr=lr, cbs=cbs)


def dense_hessian(model, loss_func, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    m64 = model.double()
    def f(flat):
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = flat[i:i + s.numel()].reshape(s); i += s.numel()
        return loss_func(functional_call(m64, ps, (x.double(),)), y.double())
    H = torch.func.hessian(f)(theta)
    model.float()
    return H


@pytest.fixture(scope='module')
def saddle_bank():
    learn = _fit(saddle_learner(cbs=SaddleCaptureCallback(every=2)), 2)
    return learn.saddle_capture.bank


# ---------------------------------------------------------------- teacher

@pytest.mark.parametrize('device', DEVICES)
def test_teacher_captures_strict_saddle(device):
    learn = _fit(saddle_learner(cbs=SaddleCaptureCallback(every=2), device=device), 2)
    cb = learn.saddle_capture
    fct.test_eq([r['step'] for r in cb.history], [2, 4, 6])
    assert all(r['captured'] for r in cb.history)
    fct.test_eq(len(cb.bank), 3)
    assert all(float(p.detach().abs().max()) == 0 for p in learn.model.parameters())  # plain SGD cannot move from the saddle
    pt = cb.bank[0]
    assert pt.grad_norm == 0 and pt.step == 2 and pt.params['0.weight'].device.type == 'cpu'
    # eigenvalues against the dense float64 Hessian of the probe loss (the whole training set here)
    x, y = [torch.cat(t) for t in zip(*[(b[0].cpu(), b[1].cpu()) for b in cb._probe])]
    ev = torch.linalg.eigvalsh(dense_hessian(saddle_model().cpu(), MSELossFlat(), x, y))
    assert ev[0] < -0.5
    fct.test_close(pt.eigenvalues, [ev[0].item(), ev[-1].item()], eps=1e-4)
    fct.test_close(pt.loss, F.mse_loss(torch.zeros_like(y), y).item(), eps=1e-5)


def test_convex_problem_captures_nothing():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=g)
    y = (x @ torch.randn(4, 3, generator=g)).argmax(1)
    idx = torch.arange(96)
    for crit in ('ratio', 'scale_free'):
        torch.manual_seed(0)
        learn = Learner(tensor_dls(x, y, idx[:64], idx[64:], bs=16, device='cpu'), nn.Linear(4, 3), loss_func=CrossEntropyLossFlat(),
                        opt_func=SGD, lr=0.5, cbs=SaddleCaptureCallback(every=1, criterion=crit, tol=1e-6, max_matvecs=15))
        _fit(learn, 2)
        h = learn.saddle_capture.history
        fct.test_eq(len(h), 7)
        assert not any(r['captured'] for r in h) and len(learn.saddle_capture.bank) == 0
        assert all(min(r['eigenvalues']) > -1e-4 * max(r['eigenvalues']) for r in h)


def test_criteria_and_gradient_gate():
    assert saddle_criterion([-0.4, 1.]) and not saddle_criterion([-0.39, 1.])
    assert saddle_criterion([-3., -2., 4., 5.]) and not saddle_criterion([-1., -1., 4., 5.])  # sums over both ends
    assert not saddle_criterion([-8., 1.], min_neg_sum=8.) and saddle_criterion([-8.1, 1.], min_neg_sum=8.)
    assert saddle_criterion([-0.2, 1.], 'scale_free', tau=0.1) and not saddle_criterion([-0.05, 1.], 'scale_free', tau=0.1)
    assert saddle_criterion([-1., -0.5], 'scale_free')  # no positive curvature at all: still negative curvature
    assert not saddle_criterion([float('nan'), 1.]) and not saddle_criterion([])
    with pytest.raises(ValueError, match='ratio.*scale_free'): saddle_criterion([1.], 'magic')
    with pytest.raises(ValueError, match='integer ≥ 2'): SaddleCaptureCallback(k=1)
    # a gradient-norm gate that the (non-stationary) point fails: tested, not captured
    learn = _fit(saddle_learner(cbs=SaddleCaptureCallback(every=1, max_grad_norm=1e-3), model=saddle_model(0.3)), 1)
    h = learn.saddle_capture.history
    assert h and all(r['grad_norm'] > 1e-3 and not r['captured'] for r in h)


def _digits_learner(cbs=None):
    set_seed(0)
    dls = digits_dls(bs=32, n_train=128, device='cpu')
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 10))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, lr=1e-2, cbs=cbs)


def test_capture_does_not_change_training(tmp_path):
    "Seeded training with the callback gives bit-identical parameters and losses (dropout exposes any RNG use)."
    ref = _fit(_digits_learner(), 2)
    cb = SaddleCaptureCallback(every=2, n_probe=48, criterion='scale_free', tau=0., save_path=tmp_path/'bank')
    got = _fit(_digits_learner(cbs=cb), 2)
    assert len(cb.history) == 3 and len(cb.bank) > 0  # the callback did its work (tau=0 captures any negative curvature)
    for (n, p), q in zip(ref.model.named_parameters(), got.model.parameters()):
        assert torch.equal(p, q), n
    assert ref.recorder.losses == got.recorder.losses
    assert got.model.training is ref.model.training
    b = SaddleBank.load(tmp_path/'bank')  # saved after the fit
    fct.test_eq(len(b), len(cb.bank))
    assert torch.equal(b[0].params['1.weight'], cb.bank[0].params['1.weight'])
    # turned off during lr_find
    n = len(cb.history)
    with got.no_bar(), got.no_logging(): got.lr_find(num_it=6, show_plot=False)
    fct.test_eq(len(cb.history), n)


# ---------------------------------------------------------------- student

def test_student_escapes_where_control_stays(saddle_bank):
    control = _fit(saddle_learner(), 5)
    l0 = control.validate()[0]
    assert all(float(p.detach().abs().max()) == 0 for p in control.model.parameters())
    student = _fit(saddle_learner(cbs=SaddleRecruitCallback(saddle_bank, generosity=2)), 5)
    cb = student.saddle_recruit
    ls = student.validate()[0]
    assert ls < 0.1 * l0, (l0, ls)
    fct.test_eq([r['event'] for r in cb.history[:3]], ['arrived', 'eigenstep', 'step'])
    fct.test_eq(cb.transitions[:3], [(0, 'approach', 'train'), (1, 'train', 'escape'), (2, 'escape', 'train')])
    r = cb.history[1]
    assert r['eigenvalue'] < 0 and r['probe_loss_after'] < r['probe_loss'] and r['alpha'] > 0
    fct.test_eq(cb.n_eigensteps, 1)


def test_perturbation_alone_escapes(saddle_bank):
    cb = SaddleRecruitCallback(saddle_bank, escape=False, noise='ball', cooldown=5, perturb_every=1)
    student = _fit(saddle_learner(cbs=cb), 5)
    ev = [r['event'] for r in cb.history]
    fct.test_eq(ev[:2], ['arrived', 'perturb'])
    assert 'keep' in ev and 'revert' not in ev[:ev.index('keep') + 1]
    k = cb.history[ev.index('keep')]
    assert k['step'] - 1 == 5 and k['probe_loss'] - k['probe_loss_after'] >= 2e-3
    assert student.validate()[0] < 0.5 * _fit(saddle_learner(), 1).validate()[0]


def _ls_learner(cbs, lr=0.):
    "Linear regression at its least-squares optimum: a strict minimum (gradient ~0, no negative curvature)."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.], [2.], [-1.]], dtype=torch.float64) + 0.3 * torch.randn(32, 1, generator=g, dtype=torch.float64)
    w = torch.linalg.lstsq(x, y).solution
    m = nn.Linear(3, 1, bias=False)
    with torch.no_grad(): m.weight.copy_(w.T.float())
    idx = torch.arange(32)
    return Learner(tensor_dls(x.float(), y.float(), idx, idx, bs=32, device='cpu'), m, loss_func=MSELossFlat(), opt_func=SGD, lr=lr, cbs=cbs)


def test_insufficient_perturbation_is_reverted_bit_exactly():
    bank = SaddleBank([SaddlePoint.from_model(_ls_learner(None).model, loss=0.)])
    cb = SaddleRecruitCallback(bank, generosity=1, perturb_every=1, cooldown=3, noise_var=0.5)
    learn = _ls_learner(cb)
    w0 = learn.model.weight.detach().clone()
    _fit(learn, 5)  # one full batch per epoch: steps 0..4
    ev = [r['event'] for r in cb.history]
    fct.test_eq(ev, ['arrived', 'perturb', 'step', 'step', 'revert'])
    assert cb.history[1]['eigenvalue'] > -1e-3  # the escape test found no negative curvature first
    r = cb.history[4]
    assert r['probe_loss_after'] > r['probe_loss']  # lr = 0: the perturbed point did not improve
    assert torch.equal(learn.model.weight.detach(), w0)  # reverted bit-exactly
    fct.test_eq([t[1:] for t in cb.transitions], [('approach', 'train'), ('train', 'perturb'), ('perturb', 'train')])


def test_eigenstep_only_when_loss_drops():
    class Quartic(nn.Module):
        "f(w) = −w0·w1 + 100‖w‖⁴: λ_min = −1 at 0, the loss drops along the eigenvector only for α < 0.0707."
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(2))
        def forward(self, x): return (-self.w[0] * self.w[1] + 100 * (self.w ** 2).sum() ** 2).expand(len(x))
    data, lf = (torch.zeros(4, 1), torch.zeros(4)), (lambda pred, y: pred.mean())
    m = Quartic()
    r = negative_curvature_step(m, lf, data, min_eigenstep=0.1)
    assert not r.taken and r.reason == 'no decrease' and r.alpha == 0.
    fct.test_close(r.eigenvalue, -1., eps=1e-5)
    assert torch.equal(m.w.detach(), torch.zeros(2))  # restored exactly
    r = negative_curvature_step(m, lf, data)
    assert r.taken and r.alpha == 0.0625 and r.loss_after < r.loss_before == 0.
    fct.test_close(m.w.detach().abs(), torch.full((2,), 0.0625 / math.sqrt(2)), eps=1e-6)
    assert m.w[0] * m.w[1] > 0  # along the negative-curvature eigenvector (1, 1)/√2
    # at a minimum: no negative curvature, no move
    lm = _ls_learner(None).model
    w0 = lm.weight.detach().clone()
    x = torch.randn(8, 3)
    r = negative_curvature_step(lm, MSELossFlat(), (x, x.sum(1, keepdim=True)))
    assert not r.taken and r.reason == 'no negative curvature' and torch.equal(lm.weight.detach(), w0)


def test_eigenstep_direction_sign():
    "With a gradient along v, the step goes downhill: θ⁺ = θ − α·sign(gᵀv)·v."
    class Tilted(nn.Module):
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(2))
        def forward(self, x): return (-self.w[0] * self.w[1] + 0.1 * (self.w[0] + self.w[1])).expand(len(x))
    m = Tilted()
    r = negative_curvature_step(m, lambda p, y: p.mean(), (torch.zeros(2, 1), torch.zeros(2)))
    assert r.taken and (m.w.detach() < 0).all()  # g = (0.1, 0.1) ∥ v: the step goes against it


def test_approach_schedule_and_skipped_steps(saddle_bank):
    torch.manual_seed(0)
    model = saddle_model(); nn.init.normal_(model[0].weight); nn.init.normal_(model[1].weight)
    p0 = [p.detach().clone() for p in model.parameters()]
    cb = SaddleRecruitCallback(saddle_bank, escape=False, perturb=False)
    learn = saddle_learner(cbs=cb, model=model, bs=64)  # one batch per epoch
    _fit(learn, 1)
    # first approach step: w_0 = 1/2 towards the target 0, and no optimizer step (SGD at lr 0.1 would differ)
    for p, q in zip(learn.model.parameters(), p0): assert torch.equal(p.detach(), q * 0.5)
    _fit(learn, 1)
    w1 = 1 - 2 ** (-1 / 10) / 2
    for p, q in zip(learn.model.parameters(), p0): fct.test_close(p.detach(), q * 0.5 * (1 - w1), eps=1e-7)
    _fit(learn, 12)
    ev = [r['event'] for r in cb.history]
    n = ev.count('approach')
    assert n >= 3 and ev[:n] == ['approach'] * n and ev[n] == 'arrived'
    assert cb.history[n]['distance'] <= 1e-2 < cb.history[n - 1]['distance']
    fct.test_eq(cb.transitions, [(n, 'approach', 'train')])
    # the limit
    cb2 = SaddleRecruitCallback(saddle_bank, epsilon=1e-30, max_approach_steps=2, escape=False, perturb=False)
    learn2 = saddle_learner(cbs=cb2, model=saddle_model(1.), bs=64)
    with pytest.warns(UserWarning, match='approach steps'): _fit(learn2, 3)
    fct.test_eq([r['event'] for r in cb2.history], ['approach', 'approach', 'approach_limit'])


class _StateSpy(Callback):
    order = 20
    def __init__(self): self.states = []
    def after_cancel_step(self):
        self.states.append(sum(len(self.learn.opt.state[p]) for p in self.learn.model.parameters()))


@pytest.mark.parametrize('reset', [True, False])
def test_optimizer_state_after_jump(saddle_bank, reset):
    spy = _StateSpy()
    cb = SaddleRecruitCallback(saddle_bank, reset_opt_state=reset)
    _fit(saddle_learner(cbs=[cb, spy], opt_func=Adam, lr=1e-2), 1)
    fct.test_eq(cb.history[1]['event'], 'eigenstep')
    # Adam built its moments at step 0 (a normal step at the saddle); the eigenstep of step 1 clears them or not
    assert (spy.states[0] == 0) if reset else (spy.states[0] > 0)


def test_smaller_student_gets_cropped_target():
    torch.manual_seed(0)
    bank = SaddleBank([SaddlePoint.from_model(DigitsCNN(8), loss=0.1), SaddlePoint.from_model(DigitsCNN(8), loss=0.2)])
    dls = digits_dls(bs=64, n_train=64, device='cpu')
    cb = SaddleRecruitCallback(bank, generosity=2, escape=False, perturb=False, n_probe=32)
    learn = Learner(dls, DigitsCNN(4), loss_func=CrossEntropyLossFlat(), cbs=cb)
    _fit(learn, 8)
    full = bank.target(2)
    # an independent oracle: centre crops (start (big − small)//2 on every axis), and fc.weight cut by conv2's kept channels
    # (16 → 8, channels 4..11) × its 4 positions, the flattened layout of DigitsCNN
    tgt = {n: full[n][tuple(slice((a - b) // 2, (a - b) // 2 + b) for a, b in zip(full[n].shape, p.shape))]
           for n, p in learn.model.named_parameters()}
    tgt['fc.weight'] = full['fc.weight'].view(10, 16, 4)[:, 4:12].reshape(10, 32)
    for n, p in learn.model.named_parameters():
        want = tgt[n]
        assert torch.equal(cb.target[n], want), n
        assert float((p.detach() - want).abs().max()) <= 2e-2  # arrived, then trained a little
    assert cb.transitions and cb.transitions[0][1:] == ('approach', 'train')


def test_recruit_errors(saddle_bank, tmp_path):
    with pytest.raises(FileNotFoundError, match='no saddle bank'): SaddleRecruitCallback(tmp_path/'none')
    with pytest.raises(TypeError, match='SaddleBank'): SaddleRecruitCallback({'w': torch.zeros(2)})
    with pytest.raises(ValueError, match='generosity'): SaddleRecruitCallback(saddle_bank, generosity=0)
    with pytest.raises(ValueError, match="noise"): SaddleRecruitCallback(saddle_bank, noise='uniform')
    learn = saddle_learner(cbs=SaddleRecruitCallback(saddle_bank), model=nn.Sequential(nn.Linear(3, 1)))
    with pytest.raises(SaddleBankError, match="missing from the bank"): _fit(learn, 1)
    big = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 1, bias=False))
    learn = saddle_learner(cbs=SaddleRecruitCallback(saddle_bank), model=big)
    with pytest.raises(SaddleBankError, match="'0.weight'.*larger"): _fit(learn, 1)
    saddle_bank.save(tmp_path/'b')
    cb = SaddleRecruitCallback(tmp_path/'b')  # from a path
    fct.test_eq(len(cb.bank), len(saddle_bank))


# ---------------------------------------------------------------- distillation

class _LossSpy(Callback):
    order = 5
    def __init__(self): self.rows = []
    def after_loss(self):
        if self.training: self.rows.append((self.xb[0].clone(), self.yb[0].clone(), self.pred.detach().clone(), self.learn.loss_grad.detach().clone(),
                                           self.learn.loss.clone()))


def test_kd_loss_matches_formula():
    torch.manual_seed(0)
    dls = digits_dls(bs=32, n_train=64, device='cpu')
    teacher = DigitsMLP((32,)).train()
    t0 = [p.detach().clone() for p in teacher.parameters()]
    spy = _LossSpy()
    learn = Learner(dls, DigitsMLP((16,)), loss_func=CrossEntropyLossFlat(), cbs=spy).distill(teacher, T=3., alpha=0.7)
    _fit(learn, 1)
    assert len(spy.rows) == 2
    assert teacher.training  # mode restored after the fit
    for x, y, s, loss, rec in spy.rows:
        with torch.no_grad(): t = teacher.eval()(x)
        pt, ps = torch.softmax(t / 3., 1), torch.softmax(s / 3., 1)
        kl = (pt * (pt.log() - ps.log())).sum(1).mean()
        ce = -torch.log_softmax(s, 1)[torch.arange(len(y)), y].mean()
        want = 0.7 * 9. * kl + 0.3 * ce
        fct.test_close(loss, want, eps=1e-5)
        fct.test_close(rec, want, eps=1e-5)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), t0))
    # validation is the plain loss: same as a learner without distillation
    plain = Learner(dls, learn.model, loss_func=CrossEntropyLossFlat())
    fct.test_close(learn.validate()[0], plain.validate()[0], eps=1e-6)
    with pytest.raises(ValueError, match='alpha'): DistillationCallback(teacher, alpha=1.5)
    with pytest.raises(ValueError, match='batch, classes'): hinton_kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor(0.))
    fct.test_close(hinton_kd_loss(s, s, torch.tensor(1.), alpha=0.25), 0.75, eps=1e-6)  # identical logits: only the hard term


def test_patches_return_learner_and_replace(saddle_bank):
    learn = saddle_learner()
    assert learn.sprkd_teacher(every=7) is learn and learn.sprkd_teacher(every=3) is learn
    fct.test_eq([c.every for c in learn.cbs if isinstance(c, SaddleCaptureCallback)], [3])
    assert learn.sprkd_student(saddle_bank, generosity=2) is learn
    fct.test_eq(learn.saddle_recruit.generosity, 2)
    assert learn.distill(saddle_model()) is learn and isinstance(learn.distillation, DistillationCallback)


def test_plots(saddle_bank):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    learn = _fit(saddle_learner(cbs=[SaddleCaptureCallback(every=2), SaddleRecruitCallback(saddle_bank, escape=False, cooldown=2,
                                                                                        perturb_every=1)]), 2)
    fig, (a, b) = plt.subplots(1, 2)
    assert learn.saddle_capture.plot(ax=a) is a and learn.saddle_recruit.plot(ax=b) is b
    assert len(a.collections) >= 1 and len(b.lines) >= 1
    plt.close(fig)


def test_probe_is_fixed_and_leaves_rng_alone():
    dls = digits_dls(bs=16, device='cpu')
    s = torch.get_rng_state()
    a, b = probe_batches(dls.train, 40, seed=3), probe_batches(dls.train, 40, seed=3)
    assert torch.equal(torch.get_rng_state(), s)
    fct.test_eq([len(x) for x, _ in a], [16, 16, 8])
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert not torch.equal(probe_batches(dls.train, 40, seed=4)[0][0], a[0][0])
    with pytest.raises(TypeError, match='fastai DataLoader'): probe_batches([(torch.zeros(1), torch.zeros(1))])


# ---------------------------------------------------------------- review fixes (session 4)
def test_validate_neither_saves_nor_checks_the_bank(tmp_path):
    "learn.validate() is not a training fit: the teacher writes no bank, the student runs no bank check (nor locks up)."
    bank_path = tmp_path/'bank'
    SaddleBank([SaddlePoint.from_model(saddle_model(0.3), loss=0.1)]).save(bank_path)
    teacher = saddle_learner(cbs=SaddleCaptureCallback(every=1000, save_path=bank_path))
    with teacher.no_bar(): teacher.validate()
    fct.test_eq(len(SaddleBank.load(bank_path)), 1)  # not replaced by the fresh teacher's empty bank
    m = saddle_model(0.3)
    names = [n for n, _ in m.named_parameters()]
    student = saddle_learner(cbs=SaddleRecruitCallback(SaddleBank([SaddlePoint.from_model(m, meta={'hessian_params': names})]),
                                                       generosity=1), model=m)
    for p in m[0].parameters(): p.requires_grad_(False)  # would fail the strict parameter-set check of a fit
    with student.no_bar(): student.validate(); student.get_preds()
    assert not student.lock.locked()
    with pytest.raises(SaddleBankError, match='other parameters'): _fit(student, 1)


def test_revert_restores_by_name_after_the_trainable_set_changed():
    "A perturbation made in one fit and reverted in the next, after a layer was frozen between them: all values come back."
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    cb = SaddleRecruitCallback(SaddleBank([SaddlePoint.from_model(m, loss=0.)]), generosity=1, grad_threshold=1e9, escape=False,
                               perturb_every=1, cooldown=2, noise_var=1., min_decrease=1e9, n_probe=64, match='intersection')
    learn = saddle_learner(cbs=cb, lr=0., model=m, bs=32)
    before = [p.detach().clone() for p in m.parameters()]
    _fit(learn, 1)  # 2 steps: arrive, perturb at step 1
    assert [r['event'] for r in cb.history][:2] == ['arrived', 'perturb'] and cb.phase == 'perturb'
    for p in m[0].parameters(): p.requires_grad_(False)
    _fit(learn, 1)  # steps 2, 3: the check at step 3 reverts
    fct.test_eq([r['event'] for r in cb.history], ['arrived', 'perturb', 'step', 'revert'])
    for a, b in zip(before, m.parameters()): assert torch.equal(a, b)


def test_pgd_epoch_limit_counts_epochs_across_fits():
    def perturbs(fits):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 1))
        cb = SaddleRecruitCallback(SaddleBank([SaddlePoint.from_model(m, loss=0.)]), generosity=1, grad_threshold=1e9,
                                   escape=False, perturb_every=1, cooldown=1, min_decrease=-1e9, pgd_epoch_limit=1, n_probe=64)
        learn = saddle_learner(cbs=cb, lr=0.01, model=m)
        out = []
        for n in fits:
            k = len(cb.history); _fit(learn, n)
            out.append(sum(r['event'] == 'perturb' for r in cb.history[k:]))
        return out
    one, three = perturbs([3]), perturbs([1, 1, 1])
    assert one[0] > 0 and three[0] == one[0] and three[1:] == [0, 0], (one, three)


def test_capture_in_train_mode_leaves_training_bit_identical():
    "eval_mode=False runs the probe with Dropout: the global RNG is restored, so the teacher trains as without the callback."
    def run(cbs):
        set_seed(0, reproducible=True)
        dls = digits_dls(bs=32, n_train=96, device='cpu')
        torch.manual_seed(1)
        m = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 10))
        _fit(Learner(dls, m, loss_func=CrossEntropyLossFlat(), opt_func=Adam, lr=1e-2, cbs=cbs), 1)
        return [p.detach().clone() for p in m.parameters()]
    ref = run([])
    got = run([SaddleCaptureCallback(every=1, n_probe=32, max_matvecs=6, criterion='scale_free', tau=0., eval_mode=False, mode='rev')])
    for a, b in zip(ref, got): assert torch.equal(a, b)


def test_eigenstep_restores_the_model_when_interrupted(monkeypatch):
    from fastsprkd.core import HessianOperator
    m = saddle_model(0.)
    x, y = saddle_dls().train_ds.tensors
    op = HessianOperator(m, MSELossFlat(), (x, y))
    orig, calls = HessianOperator.loss, [0]
    def loss(self):
        calls[0] += 1
        if calls[0] == 3: raise KeyboardInterrupt  # at the second trial point of the line search
        return orig(self)
    monkeypatch.setattr(HessianOperator, 'loss', loss)
    with pytest.raises(KeyboardInterrupt): negative_curvature_step(m, op.loss_func, op.data, eigenstep_size=100., op=op)
    for p in m.parameters(): fct.test_eq(p.detach().abs().max().item(), 0.)



def test_capture_and_recruit_follow_the_loaders_n_inp():
    "Batches (x, y, weight) with n_inp=1 and a weighted loss: the default probe calls model(x) and loss(pred, y, weight)."
    from fastai.data.core import Datasets
    from fastsprkd.data import digits_tensors
    x, y = digits_tensors(); x, y = x[:96], y[:96]
    w = torch.linspace(0.5, 1.5, 96)
    get = lambda t: (lambda i: t[i])
    dls = Datasets(list(range(96)), tfms=[[get(x)], [get(y)], [get(w)]], n_inp=1,
                   splits=[list(range(64)), list(range(64, 96))]).dataloaders(bs=16, device='cpu', num_workers=0)
    def wloss(pred, y, w): return (F.cross_entropy(pred, y, reduction='none') * w).mean()
    cap = SaddleCaptureCallback(every=1, n_probe=16, max_matvecs=8)
    _fit(Learner(dls, DigitsCNN(4), loss_func=wloss, cbs=cap), 1)
    assert len(cap.history) == 3 and all(math.isfinite(e) for r in cap.history for e in r['eigenvalues'])
    t = DigitsCNN(4)
    rec = SaddleRecruitCallback(SaddleBank([SaddlePoint.from_model(t, loss=1.)]), generosity=1, max_approach_steps=1,
                                grad_threshold=1e9, perturb_every=1, cooldown=1, n_probe=16, max_matvecs=10)
    _fit(Learner(dls, DigitsCNN(4), loss_func=wloss, cbs=rec), 1)
    assert any(r['probe_loss'] is not None for r in rec.history)  # the probe loss was evaluated
    with pytest.raises(ValueError, match='k must be an integer'): SaddleCaptureCallback(k=2.5)
