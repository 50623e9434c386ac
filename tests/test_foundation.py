import subprocess, sys, tempfile
import torch
import fastcore.test as fct
from fastsprkd.all import *


def test_digits_shapes_and_split():
    dls = digits_dls(device='cpu')
    xb, yb = dls.one_batch()
    fct.test_eq(xb.shape, (64, 1, 8, 8))
    assert xb.dtype == torch.float32 and yb.dtype == torch.long
    assert len(dls.train_ds) == 1438 and len(dls.valid_ds) == 359
    tr = set(dls.train_ds.tensors[0].flatten(1).sum(1).tolist())
    # same split whatever the global RNG
    torch.manual_seed(123)
    dls2 = digits_dls(device='cpu')
    assert torch.equal(dls.valid_ds.tensors[1], dls2.valid_ds.tensors[1])


def test_digits_options():
    dls = digits_dls(bs=16, normalize=True, channels=3, size=32, n_train=100, device='cpu')
    xb, _ = dls.one_batch()
    fct.test_eq(xb.shape, (16, 3, 32, 32))
    assert len(dls.train_ds) == 100
    fct.test_fail(lambda: digits_dls(valid_pct=1.5), contains='valid_pct')
    # in-memory tensors: no worker processes unless asked for
    fct.test_eq([dl.fake_l.num_workers for dl in dls.loaders], [0, 0])
    fct.test_eq(digits_dls(num_workers=1, device="cpu").train.fake_l.num_workers, 1)


def test_mnist_missing_files_names_the_path(tmp_path):
    fct.test_fail(lambda: mnist_dls(tmp_path), contains=str(tmp_path / 'MNIST' / 'raw'))


def test_mnist_corrupt_files_say_so(tmp_path):
    raw = tmp_path / 'MNIST' / 'raw'; raw.mkdir(parents=True)
    for n in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):
        (raw / n).write_bytes(b'\x00\x00\x08\x03' + bytes(40))  # a valid-looking header, truncated data
    fct.test_fail(lambda: mnist_dls(tmp_path), contains='may be corrupt or truncated')


def test_training_set_smaller_than_a_batch_is_refused():
    fct.test_fail(lambda: digits_dls(bs=64, n_train=10, device='cpu'), contains='fewer than one batch (bs=64)')
    assert len(digits_dls(bs=8, n_train=10, device='cpu').train) == 1


def test_models():
    fct.test_eq(num_params(SeedCNN()), 1710)
    t, s = DigitsCNN(32), DigitsCNN(16)
    assert [n for n, _ in t.named_parameters()] == [n for n, _ in s.named_parameters()]
    assert all(a.dim() == b.dim() for a, b in zip(t.parameters(), s.parameters()))


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, '-m', 'fastsprkd', '--help'], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'demo' in out.stdout and 'experiment' in out.stdout


def test_export_and_load_learner_with_the_bundled_data(tmp_path):
    "fastai's `Learner.export` empties the loaders (`dataset.new_empty()`): the bundled data supports it."
    from fastai.learner import Learner, load_learner
    dls = digits_dls(bs=32, n_train=64, device='cpu')
    learn = Learner(dls, DigitsCNN(4), loss_func=torch.nn.CrossEntropyLoss(), path=tmp_path)
    learn.export('m.pkl')
    back = load_learner(tmp_path / 'm.pkl')
    x = dls.valid.one_batch()[0][:5]
    fct.test_eq(back.model.eval()(x), learn.model.eval()(x))
