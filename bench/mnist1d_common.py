"MNIST-1D (generated offline by `mnist1d.data.make_dataset`, never downloaded) and a small 1-D CNN, for the observer benchmarks."
import torch, torch.nn as nn
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import Adam
import fastai.callback.progress  # learn.no_bar()

def mnist1d_tensors():
    from mnist1d.data import make_dataset, get_dataset_args
    d = make_dataset(get_dataset_args())  # ~5 s of numpy: 4000 train / 1000 test sequences of length 40
    f = lambda k: torch.tensor(d[k], dtype=torch.float32)[:, None]
    return f('x'), torch.tensor(d['y']), f('x_test'), torch.tensor(d['y_test'])

class CNN1d(nn.Sequential):
    "Small 1-D CNN: 3 conv layers (25 channels) and a linear head; ~5k parameters."
    def __init__(self, c=25):
        super().__init__(nn.Conv1d(1, c, 5, stride=2, padding=1), nn.ReLU(), nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(c, c, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(c * 5, 10))

def mnist1d_learner(data=None, bs=100, seed=0, opt_func=Adam, lr=1e-2):
    x, y, xv, yv = data if data is not None else mnist1d_tensors()
    torch.manual_seed(seed)
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(xv, yv)), bs=bs, num_workers=0)
    return Learner(dls, CNN1d(), loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, lr=lr)
