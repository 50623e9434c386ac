"`learn.influence` and `show_influence` (fastsprkd.interpret) on fastai Learners."
import warnings
import pytest, torch
from torch import nn
import fastcore.test as fct
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from fastai.learner import Learner
from fastai.callback.progress import ProgressCallback
from fastsprkd.analysis import influence
from fastsprkd.data import digits_dls
from fastsprkd.models import DigitsCNN
from fastsprkd.interpret import InfluenceExamples, show_influence


def ordered_batches(ds, bs):
    "The dataset's items in order, as (x, y) batches: what the rows of `learn.influence` must follow."
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    x, y = torch.stack(xs), torch.stack(ys)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def test_resnet18_vision_learner_rows_in_training_order_and_grid():
    import fastai.callback.schedule  # Learner.fine_tune
    from fastai.vision.learner import vision_learner
    from torchvision.models import resnet18
    torch.manual_seed(0)
    dls = digits_dls(bs=16, n_train=32, valid_pct=0.03, channels=3, size=32, device='cpu')
    learn = vision_learner(dls, resnet18, pretrained=False, n_out=10, loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-3)  # one frozen epoch, one unfrozen
    head = learn.model[1]
    test = [dls.valid_ds[i] for i in range(2)]
    with learn.no_bar(): infl = learn.influence(test, k=3, params=head)  # 530k parameters: EK-FAC and its damping rule
    assert isinstance(infl, InfluenceExamples) and infl.scores.shape == (32, 2) and infl.result.curvature == 'ekfac'
    xt, yt = torch.stack([t[0] for t in test]), torch.stack([t[1] for t in test])
    direct = influence(learn.model, learn.loss_func, ordered_batches(dls.train_ds, 16), (xt, yt), params=head, curvature='ekfac')
    fct.test_close(infl.result.damping, direct.damping, eps=1e-6 * direct.damping)
    fct.test_close(infl.scores, direct.scores, eps=1e-4 * direct.scores.abs().max().item())
    for j in range(2):
        fct.test_eq(infl.helpful[j], direct.scores[:, j].argsort()[:3])
        fct.test_eq(infl.harmful[j], direct.scores[:, j].argsort(descending=True)[:3])
    fig = infl.show_influence()
    assert len(fig.axes) == 2 * (1 + 2 * 3) and len(fig.axes[0].images) == 1  # images, each with its score as a title
    assert fig.axes[1].get_title().startswith('helps #') and fig.axes[4].get_title().startswith('hurts #')
    plt.close(fig)


def small_learner(n_train=96):
    torch.manual_seed(0)
    dls = digits_dls(bs=32, n_train=n_train, device='cpu')
    learn = Learner(dls, DigitsCNN(4), loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    return dls, learn


def test_test_items_as_items_batch_or_loader_agree():
    dls, learn = small_learner()
    with learn.no_bar():
        a = learn.influence([dls.valid_ds[i] for i in range(4)], k=2, damping=0.1, tol=1e-6)
        xb, yb = dls.valid.one_batch()
        b = learn.influence((xb[:4], yb[:4]), k=2, damping=0.1, tol=1e-6)
        dl = torch.utils.data.DataLoader(torch.utils.data.Subset(dls.valid_ds, range(4)), batch_size=3)
        c = learn.influence(dl, k=2, damping=0.1, tol=1e-6)
    for o in (b, c): fct.test_close(o.scores, a.scores, eps=1e-5 * a.scores.abs().max().item())
    assert (a.helpful_scores <= a.harmful_scores.min()).all() and a.helpful.shape == (4, 2)
    assert a.result.damping_rule == 'given' and 'InfluenceExamples(4 test items' in repr(a)
    fig = show_influence(a, max_n=2, k=1)
    assert len(fig.axes) == 2 * 3
    plt.close(fig)


def test_raw_items_of_a_fastai_datasets_are_labelled_by_test_dl():
    "Raw items (here indices that the Datasets' transforms turn into an image and a category) go through dls.test_dl."
    from fastai.data.core import Datasets
    from fastai.data.transforms import Categorize
    from fastai.torch_core import TensorImage
    from fastsprkd.data import digits_tensors
    x, y = digits_tensors()
    dsets = Datasets(list(range(100)), [[lambda i: TensorImage(x[i])], [lambda i: int(y[i]), Categorize()]],
                     splits=[list(range(80)), list(range(80, 100))])
    dls = dsets.dataloaders(bs=32, device='cpu', num_workers=0)
    torch.manual_seed(0)
    learn = Learner(dls, DigitsCNN(4), loss_func=nn.CrossEntropyLoss())
    with learn.no_bar():
        raw = learn.influence([81, 85], k=2, damping=0.1)
        ds_items = learn.influence([dls.valid_ds[1], dls.valid_ds[5]], k=2, damping=0.1)
    fct.test_close(raw.scores, ds_items.scores, eps=1e-5 * ds_items.scores.abs().max().item())
    fig = raw.show_influence()
    assert len(fig.axes) == 2 * 5 and len(fig.axes[1].images) == 1
    assert fig.axes[0].get_title() == f"test 0: {int(y[81])}"  # the decoded category
    plt.close(fig)


def test_progress_bar_follows_the_learner(capsys):
    dls, learn = small_learner(64)
    test = [dls.valid_ds[0]]
    with learn.no_bar(): learn.influence(test, k=1, damping=0.1)
    quiet = capsys.readouterr().out
    learn.influence(test, k=1, damping=0.1)
    loud = capsys.readouterr().out
    assert '100.00%' not in quiet and '100.00%' in loud


def test_tabular_learner_shows_rows_as_text():
    import pandas as pd
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, Normalize, CategoryBlock
    g = torch.Generator().manual_seed(0)
    n = 60
    df = pd.DataFrame({'a': torch.randint(0, 3, (n,), generator=g).tolist(), 'b': torch.randn(n, generator=g).tolist()})
    df['y'] = ((df.b + df.a * 0.5) > 0.5).astype(int)
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, Normalize], cat_names=['a'], cont_names=['b'], y_names='y',
                                     valid_idx=list(range(48, 60)), bs=16, y_block=CategoryBlock(), device='cpu', num_workers=0)
    learn = tabular_learner(dls, layers=[4])
    with learn.no_bar(): infl = learn.influence(dls.valid, k=2, damping=0.1)
    assert infl.scores.shape == (48, 12)
    fig = infl.show_influence(max_n=2)
    assert len(fig.axes) == 2 * 5 and fig.axes[1].texts and fig.axes[1].texts[0].get_text().startswith('a: ')
    plt.close(fig)


def test_non_image_items_are_shown_as_text():
    "Flat feature vectors (no image shape) are drawn as the text of their values."
    from fastsprkd.data import tensor_dls, digits_tensors
    x, y = digits_tensors()
    dls = tensor_dls(x.flatten(1), y, torch.arange(64), torch.arange(64, 80), bs=32, device='cpu')
    torch.manual_seed(0)
    learn = Learner(dls, nn.Sequential(nn.Linear(64, 10)), loss_func=nn.CrossEntropyLoss())
    with learn.no_bar(): infl = learn.influence([dls.valid_ds[0]], k=1, damping=0.1)
    fig = infl.show_influence()
    assert len(fig.axes) == 3 and not fig.axes[0].images and fig.axes[0].texts
    assert fig.axes[1].texts[0].get_text().startswith(', '.join(f"{v:.3g}" for v in dls.train_ds[infl.helpful[0, 0]][0][:2].tolist()))
    plt.close(fig)


def test_text_learner_rows_in_dataset_order_and_text_grid():
    """An AWD-LSTM text classifier (tuple output through RNNCallback; vmap refuses its padding count, so the per-sample
    losses run one sample at a time): fastai's SortedDL reads the unshuffled training set sorted by length, and the rows
    must still come in dataset order. Reference: `influence` on the loader's own batches (loader order, the same padding
    and so the same curvature), each loader sample matched to its dataset item by its tokens."""
    import sys, os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_families_fit import text_dls, text_learner
    dls = text_dls()
    learn = text_learner(dls)
    with learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, 1e-2)
        infl = learn.influence([dls.valid_ds[i] for i in range(2)], k=3, curvature='ggn', damping=1e-2)
    ds = dls.train_ds
    loader = dls.train.new(shuffle=False, drop_last=False)
    batches = [tuple(o.as_subclass(torch.Tensor) for o in b) for b in loader]
    tokens = [tuple(ds[i][0].tolist()) for i in range(len(ds))]
    pad = 1
    order = [tokens.index(tuple(t for t in row.tolist() if t != pad)) for xb, _ in batches for row in xb]
    assert order != list(range(len(ds))) and sorted(order) == list(range(len(ds)))  # the loader does reorder
    test = [tuple(o.as_subclass(torch.Tensor) for o in b) for b in infl.test_batches]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = influence(learn.model, learn.loss_func, batches, test, curvature='ggn', damping=1e-2, output_fn=lambda out: out[0])
    torch.testing.assert_close(infl.scores[order], ref.scores, rtol=1e-4, atol=1e-7)
    assert infl.result.rows == 'per-sample gradients'
    fig = infl.show_influence()
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert len(fig.axes) == 2 * 7 and all(texts) and texts[1].startswith('xxbos')
    plt.close(fig)


@pytest.mark.parametrize('family', ['vit', 'transformer'])
def test_transformer_learners_rows_in_dataset_order(family):
    "A timm ViT and an nn.TransformerEncoder classifier (attention through torch.func): the rows equal `influence` on the dataset's items in order."
    import sys, os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_families_fit import FAMILIES
    make_dls, make = FAMILIES[family]
    dls = make_dls()
    torch.manual_seed(0)
    learn = make(dls)
    test = [dls.valid_ds[i] for i in range(2)]
    with learn.no_bar(): infl = learn.influence(test, k=2, curvature='ggn', damping=0.1)
    xs, ys = zip(*test)
    ref = influence(learn.model, learn.loss_func, ordered_batches(dls.train_ds, 8), (torch.stack(xs), torch.stack(ys)),
                    curvature='ggn', damping=0.1)
    torch.testing.assert_close(infl.scores, ref.scores, rtol=1e-4, atol=1e-7)
    assert infl.result.converged
    fig = infl.show_influence()
    assert len(fig.axes) == 2 * 5
    plt.close(fig)


def test_learner_influence_bad_input():
    dls, learn = small_learner(64)
    xb, yb = dls.valid.one_batch()
    with learn.no_bar():
        fct.test_fail(lambda: learn.influence((xb[:2], yb[:2]), k=0), contains='k must be a positive integer')
        assert learn.influence((xb[:2], yb[:2]), k=1, damping=0.1).result.curvature == 'ggn'  # 2.4k parameters: the exact GGN
        fct.test_fail(lambda: learn.influence((xb[:2], yb[:2]), k=65, damping=0.1), contains='exceeds the 64 training items')
        fct.test_fail(lambda: learn.influence((xb[:2],), damping=0.1), contains='no targets')
        fct.test_fail(lambda: learn.influence([], damping=0.1), contains='empty')
        fct.test_fail(lambda: learn.influence(3, damping=0.1), contains='test_items must be')
        dl = torch.utils.data.DataLoader(dls.valid_ds, batch_size=8, shuffle=True)
        fct.test_fail(lambda: learn.influence(dl, damping=0.1), contains='shuffle=False')
        infl = learn.influence((xb[:2], yb[:2]), k=2, damping=0.1)
    fct.test_fail(lambda: infl.show_influence(k=3), contains='k must be between 1 and 2')
