"""Issue 15's fastai-fit acceptance: the five curvature/SPRKD callbacks in real short fits on the model families a fastai
user trains — an AWD-LSTM text classifier (tuple output, `RNNCallback`), a tabular learner (embeddings, BatchNorm, two
inputs), a timm ViT and an `nn.TransformerEncoder` classifier (both through `F.scaled_dot_product_attention`).

Per family: one fit without callbacks and one with the observers (`HessianSpectrumCallback`, `SharpnessCallback`) and the
teacher's `SaddleCaptureCallback`, which must leave the training bit-identical and record finite values; then a student
fit with `SaddleRecruitCallback` (approach, then eigenstep trials on the probe set) and `DistillationCallback`."""
import math, random
import warnings
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
import fastcore.test as fct
from fastai.basics import Learner, SGD, Adam, set_seed, ColReader, RandomSplitter, DataBlock, CategoryBlock
from fastai.text.all import TextBlock, BaseTokenizer, text_classifier_learner, AWD_LSTM
from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, FillMissing, Normalize
from fastsprkd.data import tensor_dls
from fastsprkd.callback.observe import HessianSpectrumCallback, SharpnessCallback
from fastsprkd.callback.sprkd import SaddleCaptureCallback, SaddleRecruitCallback, DistillationCallback
from fastsprkd.saddle import SaddleBank, SaddlePoint
from fastsprkd.core import HessianOperator

N_PROBE = 16
SPEC = dict(every=2, k=2, n_probe=N_PROBE, max_matvecs=8, ncv=4, trace_matvecs=6, tol=1e-1)

# ---------------------------------------------------------------- the four families (tiny, CPU, no download)
_WORDS = 'the a cat dog sat ran on under mat log red blue big small quick slow'.split()

def text_dls():
    g = np.random.default_rng(0)
    texts = [' '.join(g.choice(_WORDS, size=g.integers(4, 12))) for _ in range(48)]
    df = pd.DataFrame(dict(text=texts, label=['pos' if 'cat' in t else 'neg' for t in texts]))
    block = TextBlock.from_df('text', seq_len=8, tok=BaseTokenizer(), n_workers=0, min_freq=1)
    db = DataBlock(blocks=(block, CategoryBlock), get_x=ColReader('text'), get_y=ColReader('label'),
                   splitter=RandomSplitter(0.25, seed=0))
    return db.dataloaders(df, bs=8, device='cpu', num_workers=0)

_CLAS = dict(emb_sz=8, n_hid=8, n_layers=1, pad_token=1, bidir=False, output_p=0.1, hidden_p=0.1, input_p=0.1, embed_p=0.05, weight_p=0.2)

def text_learner(dls, cbs=()):
    return text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=dict(_CLAS), seq_len=8, lin_ftrs=[8], opt_func=SGD, cbs=list(cbs))

def tabular_dls():
    g = np.random.default_rng(0)
    n = 64
    df = pd.DataFrame(dict(a=g.choice(['x', 'y', 'z'], n), b=g.choice(['u', 'v'], n), c=g.normal(size=n), d=g.normal(size=n)))
    df['t'] = np.where(df.c + (df.a == 'x') > 0.3, 'hi', 'lo')
    return TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=['a', 'b'], cont_names=['c', 'd'],
                                      y_names='t', valid_idx=list(range(48, 64)), bs=8, device='cpu', num_workers=0)

def tab_learner(dls, cbs=()): return tabular_learner(dls, layers=[8], opt_func=SGD, cbs=list(cbs))

def image_dls():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 16, 16, generator=g), torch.randint(0, 3, (48,), generator=g)
    return tensor_dls(x, y, torch.arange(32), torch.arange(32, 48), bs=8, device='cpu')

def vit_learner(dls, cbs=()):
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=16, patch_size=8, in_chans=3, num_classes=3, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.)
    return Learner(dls, vit, loss_func=nn.CrossEntropyLoss(), opt_func=Adam, cbs=list(cbs))

def token_dls():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 12, (48, 10), generator=g)
    y = (x == 3).sum(1).clamp(max=2)
    return tensor_dls(x, y, torch.arange(32), torch.arange(32, 48), bs=8, device='cpu')

class TransformerClassifier(nn.Module):
    def __init__(self, vocab=12, d=8, n_class=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 16, dropout=0.1, batch_first=True), 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_class)
    def forward(self, x): return self.head(self.enc(self.emb(x)).mean(1))

def transformer_learner(dls, cbs=()):
    return Learner(dls, TransformerClassifier(), loss_func=nn.CrossEntropyLoss(), opt_func=Adam, cbs=list(cbs))

FAMILIES = dict(text=(text_dls, text_learner), tabular=(tabular_dls, tab_learner), vit=(image_dls, vit_learner),
                transformer=(token_dls, transformer_learner))

# ---------------------------------------------------------------- helpers
def fit(make, dls, cbs, seed=0, lr=1e-2):
    set_seed(seed)
    for dl in dls.loaders: dl.rng = random.Random(seed)  # a fastai DataLoader's own shuffling generator: the same order in every fit
    learn = make(dls, cbs)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # small Lanczos budgets: convergence warnings are expected
        learn.fit(1, lr)
    return learn

def finite(*xs): return all(x is not None and math.isfinite(float(x)) for x in xs)

@pytest.mark.parametrize('family', list(FAMILIES))
def test_callbacks_in_a_fit(family):
    make_dls, make = FAMILIES[family]
    dls = make_dls()
    ref = fit(make, dls, [])
    spec, sharp = HessianSpectrumCallback(**SPEC), SharpnessCallback(every=2)
    cap = SaddleCaptureCallback(every=2, n_probe=N_PROBE, max_matvecs=6, tol=1e-1)
    got = fit(make, dls, [spec, sharp, cap])
    # the observers and the teacher's capture leave the training bit for bit as it was
    for (n, a), b in zip(ref.model.state_dict().items(), got.model.state_dict().values()): assert torch.equal(a, b), (family, n)
    assert spec.history and sharp.history and cap.history, family
    for r in spec.history: assert finite(r['lambda_max'], r['lambda_min'], r['trace']), (family, r)
    for r in sharp.history: assert finite(r['grad_corr'], r['dir_sharpness']), (family, r)
    for r in cap.history: assert finite(r['loss'], *r['eigenvalues']), (family, r)
    assert cap._op is None and spec._op is None  # the operators (model, probe, kept graph) are dropped at the end of the fit
    # student: approach a bank point of the teacher, then eigenstep trials on the probe set; Hinton distillation at once
    r = cap.history[-1]
    bank = SaddleBank([SaddlePoint.from_model(got.model, eigenvalues=r['eigenvalues'], loss=r['loss'], grad_norm=r['grad_norm'],
                                              step=r['step'], epoch=0, meta={'hessian_params': list(r['hessian_params'])})])
    rec = SaddleRecruitCallback(bank, generosity=1, max_approach_steps=1, grad_threshold=1e9, perturb_every=1, cooldown=1,
                                n_probe=N_PROBE, max_matvecs=8, tol=1e-1, min_eigenstep=0.25)
    kd = DistillationCallback(got.model, T=2., alpha=0.5)
    student = fit(make, dls, [rec, kd], seed=1)
    events = [h['event'] for h in rec.history]
    assert events[:2] == ['approach', 'approach_limit'], (family, events)
    tried = [h for h in rec.history if h['eigenvalue'] is not None]
    assert tried and all(finite(h['eigenvalue'], h['probe_loss']) for h in tried), (family, events)
    assert all(finite(h['loss']) for h in rec.history), family
    assert all(torch.isfinite(p).all() for p in student.model.parameters()), family

def test_text_output_fn_is_derived_and_explicit():
    "The text learner's tuple output: derived from RNNCallback, or given; the operator alone names the fix."
    dls = text_dls()
    learn = fit(text_learner, dls, [])
    cb = SaddleCaptureCallback(every=1, n_probe=N_PROBE)
    learn.add_cb(cb)
    cb.learn = learn
    xb, yb = cb.probe_set()[0]
    with pytest.raises(TypeError, match=r"tuple.*output_fn="):
        HessianOperator(learn.model, learn.loss_func, (xb, yb))
    ref = HessianOperator(learn.model, learn.loss_func, (xb, yb), output_fn=lambda o: o[0])
    fct.test_close(cb.operator().loss(), ref.loss(), eps=1e-6)
    explicit = SaddleCaptureCallback(every=1, n_probe=N_PROBE, output_fn=lambda o: o[0])
    learn.add_cb(explicit)
    explicit.learn = learn
    fct.test_close(explicit.operator().gradient(), ref.gradient(), eps=1e-6)
    learn.remove_cbs([cb, explicit])

def test_analysis_functions_take_output_fn():
    "influence, per_sample_gradients and loss_landscape on a tuple-output model with output_fn equal the plain model's."
    from fastsprkd.analysis import influence, per_sample_gradients, loss_landscape
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    class Pair(nn.Module):
        def __init__(self): super().__init__(); self.lin = lin
        def forward(self, x): o = self.lin(x); return o, o.detach() * 2
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    ce, pick = nn.CrossEntropyLoss(), (lambda o: o[0])
    fct.test_close(influence(Pair(), ce, (x[:8], y[:8]), (x[8:], y[8:]), method='exact', output_fn=pick).scores,
                   influence(lin, ce, (x[:8], y[:8]), (x[8:], y[8:]), method='exact').scores, eps=1e-10)
    fct.test_close(per_sample_gradients(Pair(), ce, (x, y), output_fn=pick), per_sample_gradients(lin, ce, (x, y)), eps=1e-12)
    fct.test_close(loss_landscape(Pair(), ce, (x, y), 'gradient', torch.linspace(-1, 1, 5), output_fn=pick).losses,
                   loss_landscape(lin, ce, (x, y), 'gradient', torch.linspace(-1, 1, 5)).losses, eps=1e-12)
    with pytest.raises(TypeError, match='output_fn='): loss_landscape(Pair(), ce, (x, y), 'gradient')
