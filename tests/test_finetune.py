"""The callbacks inside an ordinary fastai fine-tuning pipeline (issue 9): `vision_learner(dls, resnet18, pretrained=False)`
on the bundled digits (3 channels, upsampled to 32×32), `fine_tune(1, freeze_epochs=1)`: one frozen epoch (head and
BatchNorm trainable), unfreeze, one epoch with everything trainable. Kept small (48 images, 3 steps an epoch, probe
sets of 8 images, a few Hessian-vector products per measurement) so the file runs in about a minute on one thread."""
import hashlib, math, random, warnings
import numpy as np
import pytest, torch
from torch import nn
import fastcore.test as fct
import fastai.callback.progress  # Learner.no_bar
import fastai.callback.schedule  # Learner.fine_tune, fit_one_cycle
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Learner
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18
from fastsprkd.core import HessianOperator
from fastsprkd.eigen import eigsh
from fastsprkd.data import digits_dls
from fastsprkd.models import DigitsMLP
from fastsprkd.saddle import SaddleBank, SaddleBankError
from fastsprkd.callback.observe import HessianSpectrumCallback, SharpnessCallback
from fastsprkd.callback.sprkd import SaddleCaptureCallback, SaddleRecruitCallback, DistillationCallback, hinton_kd_loss

N_TRAIN, BS, N_PROBE = 48, 16, 8  # 3 steps an epoch: steps 0-2 frozen, 3-5 unfrozen


def _seed(s=0):
    random.seed(s); np.random.seed(s); torch.manual_seed(s)


def resnet_learner(cbs=None, seed=0) -> Learner:
    "A fresh ResNet-18 learner on a fresh (identically seeded) digits DataLoaders, so that two runs shuffle alike."
    _seed(seed)
    dls = digits_dls(bs=BS, channels=3, size=32, n_train=N_TRAIN, valid_pct=0.03, device='cpu')  # 54 validation images
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return vision_learner(dls, resnet18, pretrained=False, n_out=10, loss_func=nn.CrossEntropyLoss(), cbs=cbs)


def fine_tune(learn) -> Learner:
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, freeze_epochs=1)
    return learn


def _names(learn, frozen:bool) -> tuple:
    "The parameter names trainable in a frozen (head + BatchNorm) or unfrozen learner."
    learn.freeze() if frozen else learn.unfreeze()
    return tuple(n for n, p in learn.model.named_parameters() if p.requires_grad)


@pytest.fixture(scope='module')
def names():
    learn = resnet_learner()
    return dict(frozen=_names(learn, True), all=_names(learn, False))


def _finite(*xs): return all(x is not None and math.isfinite(x) for x in xs)


def _params_id(names) -> str:
    "The rows' `params_id` of a parameter set: first 8 hex digits of the SHA-1 of the names."
    return hashlib.sha1('\n'.join(names).encode()).hexdigest()[:8]


def _check_set_records(rows, sets, model):
    "Each row's parameter-set record (`n_params`, `params_id`) names the set it was measured w.r.t."
    if 'params_id' not in rows[0]: return False  # an observe.py without parameter-set records
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    fct.test_eq([r['n_params'] for r in rows], [sum(sizes[n] for n in s) for s in sets])
    fct.test_eq([r['params_id'] for r in rows], [_params_id(s) for s in sets])
    return True


@pytest.fixture(scope='module')
def observed(names):
    "A teacher fine-tuned with both observers and the saddle capture, and the same fine_tune without any callback."
    base = fine_tune(resnet_learner())
    cbs = [HessianSpectrumCallback(n_probe=N_PROBE, trace=False, at_epoch_end=True),  # one frozen epoch, one unfrozen
           SharpnessCallback(every=3),  # steps 0 (frozen) and 3 (unfrozen)
           SaddleCaptureCallback(every=2, n_probe=N_PROBE, max_matvecs=5, criterion='scale_free', tau=0., mode='rev')]  # 2, 4
    obs = fine_tune(resnet_learner(cbs))
    return base, obs, cbs


def test_observers_leave_fine_tune_bit_identical(observed):
    base, obs, _ = observed
    for (n, p), q in zip(base.model.named_parameters(), obs.model.parameters()):
        assert torch.equal(p, q), f"{n} differs: an observer changed the training"
    for (n, b), c in zip(base.model.named_buffers(), obs.model.buffers()): assert torch.equal(b, c), n
    fct.test_eq(base.recorder.losses, obs.recorder.losses)


def test_spectrum_under_fine_tune(observed, names):
    hs = observed[1].hessian_spectrum
    fct.test_eq([r['fit'] for r in hs.history], [0, 1])  # fine_tune = two fits: frozen, then unfrozen
    for r in hs.history:
        assert _finite(r['lambda_min'], r['lambda_max']) and r['lambda_min'] <= r['lambda_max'], r
        assert r['num_matvecs'] > 0
    _check_set_records(hs.history, [names['frozen'], names['all']], observed[1].model)


def test_sharpness_under_fine_tune(observed, names):
    sh = observed[1].sharpness
    fct.test_eq([(r['step'], r['fit']) for r in sh.history], [(1, 0), (4, 1)])  # `step`: optimizer steps taken, this one included
    for r in sh.history:
        assert _finite(r['grad_corr'], r['dir_sharpness'], r['grad_norm'], r['update_norm']), r
        assert r['update_norm'] > 0 and r['grad_corr'] < 0  # an Adam step goes downhill
    _check_set_records(sh.history, [names['frozen'], names['all']], observed[1].model)


def test_capture_follows_the_trainable_set(observed, names):
    cap = observed[1].saddle_capture
    fct.test_eq([r['step'] for r in cap.history], [2, 4])
    fct.test_eq([r['hessian_params'] for r in cap.history], [names['frozen'], names['all']])
    assert _check_set_records(cap.history, [names['frozen'], names['all']], observed[1].model)
    sizes = {n: p.numel() for n, p in observed[1].model.named_parameters()}
    for r in cap.history: assert all(math.isfinite(e) for e in r['eigenvalues']) and _finite(r['grad_norm'], r['loss']), r
    # a randomly initialized ResNet has negative curvature: every test banks its point, which records its Hessian's parameters
    fct.test_eq(len(cap.bank), 2)
    fct.test_eq([tuple(p.meta['hessian_params']) for p in cap.bank], [names['frozen'], names['all']])
    assert all(p.meta['dtype'] == 'torch.float32' for p in cap.bank)
    fct.test_eq(list(cap.bank[0].params), list(sizes))  # a point holds every parameter (the frozen body too)


def _frozen_bank(observed, names):
    return SaddleBank(p for p in observed[1].saddle_capture.bank if tuple(p.meta['hessian_params']) == names['frozen'])


def test_recruit_refuses_or_intersects_a_mismatch(observed, names):
    bank = observed[1].saddle_capture.bank  # points w.r.t. the frozen set and w.r.t. all parameters
    learn = resnet_learner(SaddleRecruitCallback(bank, generosity=2, n_probe=N_PROBE))
    learn.freeze()
    with pytest.raises(SaddleBankError, match=r"match='intersection'") as e: learn.fit(0)
    msg = str(e.value)
    assert "'0.0.weight'" in msg and 'frozen' in msg and 'learn.freeze()' in msg, msg  # names the parameter and the fix
    learn = resnet_learner(SaddleRecruitCallback(bank, generosity=2, n_probe=N_PROBE, match='intersection'))
    learn.freeze()
    learn.fit(0)
    fct.test_eq(learn.saddle_recruit.recruited, names['frozen'])
    # unfrozen student, bank of frozen-phase points: refused too (the body's parameters were not part of that Hessian)
    learn = resnet_learner(SaddleRecruitCallback(_frozen_bank(observed, names), n_probe=N_PROBE))
    with pytest.raises(SaddleBankError, match='0.0.weight'): learn.fit(0)


class _Watch(Callback):
    "Records a frozen body weight at the start and end of every fit."
    order = 99
    def __init__(self): self.rows = []
    def before_fit(self): self._w = self.model[0][0].weight.detach().clone()
    def after_fit(self): self.rows.append(torch.equal(self._w, self.model[0][0].weight))


def test_recruit_under_fine_tune_and_fp16(observed, names):
    bank = _frozen_bank(observed, names)
    # escapes by perturbation only (an eigenstep on 11.7M parameters would cost ~20 s here; test_sprkd covers eigensteps)
    rec = SaddleRecruitCallback(bank, generosity=1, max_approach_steps=2, grad_threshold=math.inf, escape=False,
                                perturb_every=1, cooldown=1, noise_var=1e-4, n_probe=N_PROBE)
    watch = _Watch()
    learn = resnet_learner([rec, watch], seed=1).to_fp16()  # another initialization than the teacher's  # fastai 2.8's MixedPrecision is CUDA-only: a no-op on this CPU
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fine_tune(learn)
    h = rec.history
    fct.test_eq([r['step'] for r in h], list(range(6)))  # one row per step
    fct.test_eq([r['event'] for r in h[:3]], ['approach', 'approach', 'approach_limit'])
    fct.test_eq([r['recruited'] for r in h], [names['frozen']] * 3 + [names['all']] * 3)  # the set changes at unfreeze
    fct.test_eq([r['params_id'] for r in h], [_params_id(names['frozen'])] * 3 + [_params_id(names['all'])] * 3)
    assert watch.rows[0], "a frozen parameter was moved in the frozen epoch"
    assert all(_finite(r['loss'], r['grad_norm']) for r in h)
    # after the unfreeze, the perturbation covers all 11.7M parameters, and its check reverts or keeps it
    fct.test_eq(h[3]['event'], 'perturb')
    assert h[4]['event'] in ('keep', 'revert') and _finite(h[4]['probe_loss'], h[4]['probe_loss_after']), h[4]
    fct.test_eq([t[1:] for t in rec.transitions[:3]], [('approach', 'train'), ('train', 'perturb'), ('perturb', 'train')])
    assert all(math.isfinite(l) for l in learn.recorder.losses)


class _CheckKD(Callback):
    "Recomputes the distillation loss from the teacher's own forward pass (runs after DistillationCallback)."
    order = 1
    def __init__(self, teacher): self.teacher, self.diffs = teacher, []
    def after_loss(self):
        if not self.training: return
        with torch.no_grad(): t = self.teacher(*self.xb)
        hard = nn.functional.cross_entropy(self.pred, *self.yb)
        self.diffs.append(float((hinton_kd_loss(self.pred, t, hard, 4., 0.9).detach() - self.learn.loss).abs()))


def test_distillation_from_resnet_teacher(observed):
    teacher = observed[1]  # a Learner: its model is the teacher
    t_params = [p.detach().clone() for p in teacher.model.parameters()]
    t_mode = teacher.model.training
    check = _CheckKD(teacher.model)
    student = fine_tune(resnet_learner([DistillationCallback(teacher, T=4., alpha=0.9), check], seed=1))
    fct.test_eq(len(check.diffs), 6)  # every training step trained on the distillation loss
    assert max(check.diffs) < 1e-4, check.diffs
    assert all(math.isfinite(l) for l in student.recorder.losses)
    assert all(torch.equal(p, q) for p, q in zip(t_params, teacher.model.parameters()))
    fct.test_eq(teacher.model.training, t_mode)


class _CPUMixedPrecision(MixedPrecision):
    "fastai 2.8's MixedPrecision on the CPU: float16 autocast and an enabled GradScaler (fastai's own is CUDA-only)."
    def before_fit(self):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            super().before_fit()
        self.autocast = torch.autocast('cpu', dtype=torch.float16)
        self.learn.scaler = torch.amp.GradScaler('cpu', init_scale=2.**12)


class _UnscaledNorm(Callback):
    "Gradient norm as the optimizer sees it: in before_step, after MixedPrecision unscaled the gradients."
    order = MixedPrecision.order + 1
    def __init__(self): self.norms, self.scales = [], []
    def before_step(self):
        self.scales.append(self.learn.scaler.get_scale())
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in self.model.parameters()]))))


def test_capture_under_mixed_precision_unscales_and_stays_float32():
    _seed(0)
    dls = digits_dls(bs=32, n_train=64, device='cpu')
    mp, cap, un = _CPUMixedPrecision(), SaddleCaptureCallback(every=1, n_probe=32, max_matvecs=8, mode='rev'), _UnscaledNorm()
    learn = Learner(dls, DigitsMLP((16,)), loss_func=nn.CrossEntropyLoss(), cbs=[mp, cap, un])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    fct.test_eq(un.scales[:2], [2.**12] * 2)  # the loss really was scaled
    fct.test_eq([r['step'] for r in cap.history], [1])
    fct.test_close(cap.history[0]['grad_norm'], un.norms[1], eps=1e-5 * un.norms[1])  # unscaled, as the optimizer sees it
    # the Hessian is float32 and independent of autocast: the same eigenvalues from a float32 operator at the point,
    # and from a capture called inside a float16 autocast region
    pt = cap.bank[0] if len(cap.bank) else None
    model = learn.model
    with torch.no_grad():
        saved = [p.clone() for p in model.parameters()]
        ref_model = DigitsMLP((16,))
        ref_model.load_state_dict({**model.state_dict()})
    op = HessianOperator(ref_model, nn.CrossEntropyLoss(), cap._probe, mode='rev')
    assert op.dtype == torch.float32
    plain = cap.capture(step=99)['eigenvalues']
    cap.history.pop()  # the Lanczos seed depends on the history length: the same start vector again
    with torch.autocast('cpu', dtype=torch.float16): auto = cap.capture(step=100)['eigenvalues']
    fct.test_eq(plain, auto)
    ref = eigsh(op, 2, 'BE', tol=cap.tol, max_matvecs=cap.max_matvecs, ncv=8, seed=cap.seed + 1).eigenvalues.tolist()
    fct.test_close(plain, ref, eps=1e-4 * max(abs(e) for e in ref))
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))
    if pt is not None: fct.test_eq(pt.meta['dtype'], 'torch.float32')
