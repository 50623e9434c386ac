"The shared base of the curvature callbacks (issue 18): one set of names, the old ones mapped with a warning, grouped SPRKD settings."
import warnings
import pytest
import torch
from torch import nn
import fastcore.test as fct
from fastai.basics import Learner, SGD, set_seed
from fastsprkd.data import tensor_dls
from fastsprkd.callback.core import CurvatureCallback
from fastsprkd.callback.observe import HessianSpectrumCallback, SharpnessCallback
from fastsprkd.callback.sprkd import (SaddleCaptureCallback, SaddleRecruitCallback, ApproachSettings, EigenstepSettings,
                                      PerturbationSettings)
from fastsprkd.saddle import SaddleBank, SaddlePoint

def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    return x, y, tensor_dls(x, y, torch.arange(48), torch.arange(48, 64), bs=8, device='cpu')

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

def test_one_set_of_names():
    x, y, _ = data()
    bank = SaddleBank([SaddlePoint.from_model(model(), eigenvalues=[-1., 1.], loss=1., grad_norm=0., step=1, epoch=0)])
    cbs = [HessianSpectrumCallback(every=1), SharpnessCallback(), SaddleCaptureCallback(), SaddleRecruitCallback(bank)]
    for cb in cbs:
        assert isinstance(cb, CurvatureCallback)
        for name in ('probe', 'n_probe', 'probe_bs', 'seed', 'params', 'eval_mode', 'mode', 'output_fn'): assert hasattr(cb, name), (cb, name)
        fct.test_eq((cb.n_probe, cb.eval_mode), (128, True))
    fct.test_eq(cbs[1].mode, 'rev')  # a new operator every step: 'auto' would time both modes at every step
    fct.test_eq(HessianSpectrumCallback(every=1, probe=(x, y)).probe, (x, y))
    for bad in ('eval', 1, None):
        with pytest.raises(ValueError, match='eval_mode'): SaddleCaptureCallback(eval_mode=bad)

def test_old_names_are_mapped_with_a_deprecation_warning():
    x, y, _ = data()
    with pytest.warns(DeprecationWarning, match=r"data=.*probe="):
        cb = HessianSpectrumCallback(every=1, data=(x[:8], y[:8]))
    fct.test_eq(cb.probe, (x[:8], y[:8]))
    with pytest.warns(DeprecationWarning, match=r"train_bn=.*eval_mode='train_bn'"):
        cb = HessianSpectrumCallback(every=1, train_bn=True)
    fct.test_eq(cb.eval_mode, 'train_bn')
    with pytest.warns(DeprecationWarning): fct.test_eq(HessianSpectrumCallback(every=1, train_bn=False).eval_mode, True)
    with pytest.raises(ValueError, match="once"): HessianSpectrumCallback(every=1, probe=(x, y), data=(x, y))

def test_spectrum_train_bn_and_eval_mode_train_bn_agree():
    def run(**kw):
        set_seed(0)
        x, y, dls = data()
        m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        cb = HessianSpectrumCallback(at_epoch_end=True, probe=(x[:16], y[:16]), trace=False, tol=1e-8, max_matvecs=60, ncv=None, **kw)
        learn = Learner(dls, m, loss_func=nn.CrossEntropyLoss(), opt_func=SGD, cbs=cb)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
        return cb.history[-1]['eigenvalues']
    new = run(eval_mode='train_bn')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        fct.test_eq(run(train_bn=True), new)
    assert run() != new  # eval mode (running statistics) is another Hessian

def _recruit_fit(**kw):
    bank = SaddleBank([SaddlePoint.from_model(model(), eigenvalues=[-1., 1.], loss=1., grad_norm=0., step=1, epoch=0)])
    set_seed(1)  # also the seed of the loaders' shuffling generator, drawn when they are built
    x, y, dls = data()
    rec = SaddleRecruitCallback(bank, generosity=1, max_approach_steps=2, grad_threshold=1e9, n_probe=16, **kw)
    learn = Learner(dls, nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), loss_func=nn.CrossEntropyLoss(), opt_func=SGD, cbs=rec)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, 1e-2)
    return rec, learn

def test_approach_only_arm():
    "EXP's 'approach only' arm: the approach, then normal training; no eigensolve and no perturbation."
    rec, learn = _recruit_fit(max_negative_eigensteps=0, perturb=False)
    events = [h['event'] for h in rec.history]
    fct.test_eq(events[:3], ['approach', 'approach', 'approach_limit'])
    fct.test_eq(set(events[3:]), {'step'})
    assert all(h['eigenvalue'] is None and h['probe_loss'] is None for h in rec.history)
    grouped, learn2 = _recruit_fit(eigensteps=EigenstepSettings(enabled=False), perturbation=PerturbationSettings(enabled=False))
    fct.test_eq([h['event'] for h in grouped.history], events)
    for a, b in zip(learn.model.parameters(), learn2.model.parameters()): assert torch.equal(a, b)
    full, _ = _recruit_fit(perturb_every=1, cooldown=1)  # the full arm does try the moves on the same run
    assert any(h['eigenvalue'] is not None for h in full.history)

def test_grouped_settings_equal_the_flat_arguments():
    bank = SaddleBank([SaddlePoint.from_model(model(), eigenvalues=[-1., 1.], loss=1., grad_norm=0., step=1, epoch=0)])
    rec = SaddleRecruitCallback(bank, epsilon=0.5, approach_halflife=3., eigenstep_size=0.5, tol=1e-4, noise='ball', perturb_every=2)
    fct.test_eq(rec.approach, ApproachSettings(epsilon=0.5, halflife=3.))
    fct.test_eq(rec.eigensteps, EigenstepSettings(size=0.5, tol=1e-4))
    fct.test_eq(rec.perturbation, PerturbationSettings(noise='ball', every=2))
    with pytest.raises(ValueError, match='epsilon'): SaddleRecruitCallback(bank, epsilon=0.5, approach=ApproachSettings())
    with pytest.raises(TypeError, match='EigenstepSettings'): SaddleRecruitCallback(bank, eigensteps=dict(enabled=False))
    with pytest.raises(ValueError, match='noise'): SaddleRecruitCallback(bank, perturbation=PerturbationSettings(noise='uniform'))

def test_flat_setting_names_stay_attributes():
    bank = SaddleBank([SaddlePoint.from_model(model(), eigenvalues=[-1., 1.], loss=1., grad_norm=0., step=1, epoch=0)])
    rec = SaddleRecruitCallback(bank, epsilon=0.5, perturb=False)
    fct.test_eq((rec.epsilon, rec.perturb, rec.max_negative_eigensteps), (0.5, False, 50))
    rec.max_negative_eigensteps = 0
    fct.test_eq(rec.eigensteps.max_steps, 0)
