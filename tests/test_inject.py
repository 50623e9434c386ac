"Layout-aware injection: a Linear after a flattened conv gets the channel-aligned crop; the bank check refuses what it cannot map."
import warnings
import pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
import fastai.callback.schedule  # noqa: F401
from fastsprkd.data import mnist1d_dls
from fastsprkd.models import DigitsCNN, Mnist1dCNN
from fastsprkd.saddle import SaddleBank, SaddlePoint, SaddleBankError, crop_params, inject, flatten_layout


def _net(conv, c, pos_side, nd):
    "conv(1→c, 3, padding 1) → ReLU → Flatten → Linear(c·side^nd → 5), for inputs of side `pos_side`."
    return nn.Sequential(conv(1, c, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(c * pos_side ** nd, 5))


@pytest.mark.parametrize('conv,nd,side', [(nn.Conv1d, 1, 12), (nn.Conv2d, 2, 5)])
def test_flattened_conv_crop_is_channel_aligned(conv, nd, side):
    torch.manual_seed(0)
    teacher, student = _net(conv, 8, side, nd), _net(conv, 5, side, nd)
    P = side ** nd
    fct_layout = flatten_layout(student)
    assert fct_layout == {'3.weight': ('0.weight', 5, P)}, fct_layout
    inject(student, dict(teacher.named_parameters()))
    # hand-built: conv keeps output channels (8-5)//2 = 1 .. 5; the Linear keeps every position of those channels
    W = teacher[3].weight.detach()
    want = torch.cat([W[:, c * P:(c + 1) * P] for c in range(1, 6)], dim=1)
    assert torch.equal(student[3].weight.detach(), want)
    assert torch.equal(student[0].weight.detach(), teacher[0].weight.detach()[1:6])
    assert torch.equal(student[3].bias.detach(), teacher[3].bias.detach())
    # the student with the channel-aligned weights computes the teacher's features of the kept channels exactly
    x = torch.randn(3, 1, *([side] * nd))
    feats = teacher[1](teacher[0](x))[:, 1:6].flatten(1)
    torch.testing.assert_close(student(x), feats @ want.T + teacher[3].bias.detach())


def test_flatten_in_forward_and_example():
    "DigitsCNN flattens in `forward` after a pool (no Flatten module); a non-square input needs `example`."
    assert flatten_layout(DigitsCNN(16)) == {'fc.weight': ('conv2.weight', 32, 4)}
    class Rect(nn.Module):  # 6×4 inputs: no square synthesized input fits
        def __init__(self, c):
            super().__init__(); self.conv = nn.Conv2d(1, c, 3, padding=1); self.fc = nn.Linear(c * 24, 3)
        def forward(self, x): return self.fc(torch.relu(self.conv(x)).flatten(1))
    teacher, student = Rect(6), Rect(4)
    assert flatten_layout(student) is None
    with pytest.warns(UserWarning, match="could not be traced.*example="):
        crop_params(dict(teacher.named_parameters()), student)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        inject(student, dict(teacher.named_parameters()), example=torch.randn(2, 1, 6, 4))
    assert torch.equal(student.fc.weight.detach(), teacher.fc.weight.detach().view(3, 6, 24)[:, 1:5].reshape(3, 96))


def test_bank_check_refuses_unmappable_layout():
    "Shape-compatible (student smaller in every dimension) but the teacher's columns are 8 channels × 16 positions, the student's 2 × 36."
    teacher, student = _net(nn.Conv2d, 8, 4, 2), _net(nn.Conv2d, 2, 6, 2)
    bank = SaddleBank([SaddlePoint.from_model(teacher, loss=0.1)])
    with pytest.raises(SaddleBankError, match="cannot map '3.weight'.*2 channels × 36 positions.*layout differs"):
        bank.check_compatible(student)
    with pytest.raises(SaddleBankError, match="cannot map"): inject(student, bank.target(1))
    fct = bank.check_compatible(_net(nn.Conv2d, 2, 4, 2))
    assert fct == 'crop'


def test_trained_mnist1d_teacher_crop():
    "A trained MNIST-1D teacher's layout-aware crop scores like the hand-built channel-aligned crop (and it is that crop)."
    set_seed(0)
    dls = mnist1d_dls(device='cpu')
    learn = Learner(dls, Mnist1dCNN(54), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 3e-2)
    t = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    student = inject(Mnist1dCNN(25), t)
    off = (54 - 25) // 2
    hand = Mnist1dCNN(25)
    with torch.no_grad():
        hand.conv1.weight.copy_(t['conv1.weight'][off:off + 25]); hand.conv1.bias.copy_(t['conv1.bias'][off:off + 25])
        for c in ('conv2', 'conv3'):
            getattr(hand, c).weight.copy_(t[f'{c}.weight'][off:off + 25, off:off + 25]); getattr(hand, c).bias.copy_(t[f'{c}.bias'][off:off + 25])
        hand.linear.weight.copy_(t['linear.weight'].view(10, 54, 5)[:, off:off + 25].reshape(10, 125)); hand.linear.bias.copy_(t['linear.bias'])
    x, y = dls.valid_ds.tensors
    acc = lambda m: float((m(x).argmax(1) == y).float().mean())
    with torch.no_grad(): a_inj, a_hand = acc(student), acc(hand)
    assert abs(a_inj - a_hand) <= 0.05, (a_inj, a_hand)
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), hand.parameters()))


def test_linear_after_linear_keeps_the_centre_crop():
    "conv → flatten → fc1 → ReLU → fc2: fc2 reads fc1's units (centre crop) even where its width equals a conv output's size."
    def net(c, h):  # conv output: c channels × 4 positions = 4c values; fc2 reads h = 4c units
        return nn.Sequential(nn.Conv1d(1, c, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * c, h), nn.ReLU(), nn.Linear(h, 3))
    teacher, student = net(8, 32), net(4, 16)
    fct_layout = flatten_layout(student)
    assert fct_layout == {'3.weight': ('0.weight', 4, 4)}, fct_layout
    inject(student, dict(teacher.named_parameters()))
    W1, W2 = teacher[3].weight.detach(), teacher[5].weight.detach()
    assert torch.equal(student[3].weight.detach(), W1.view(32, 8, 4)[8:24, 2:6].reshape(16, 16))
    assert torch.equal(student[5].weight.detach(), W2[:, 8:24])


def test_trace_leaves_the_model_as_it_was():
    "The shape trace swaps meta tensors into the parameter and buffer slots and puts the very same objects back."
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3))
    before = [(id(t), t.clone()) for t in list(m.parameters()) + list(m.buffers())]
    fct_layout = flatten_layout(m)
    assert fct_layout == {'4.weight': ('0.weight', 4, 25)}, fct_layout
    after = list(m.parameters()) + list(m.buffers())
    assert [id(t) for t in after] == [i for i, _ in before]
    assert all(torch.equal(t, c) and t.device.type == 'cpu' for t, (_, c) in zip(after, before))
    assert all(isinstance(p, nn.Parameter) for p in m.parameters())
    class Boom(nn.Module):  # a forward that fails after the swap: restored all the same
        def __init__(self): super().__init__(); self.conv = nn.Conv2d(1, 2, 3); self.fc = nn.Linear(2, 2)
        def forward(self, x): raise KeyboardInterrupt
    b = Boom(); ps = list(b.parameters())
    with pytest.raises(KeyboardInterrupt): flatten_layout(b, example=torch.zeros(1, 1, 5, 5))
    assert list(b.parameters()) == ps and all(p.device.type == 'cpu' for p in ps)


def test_a_coincidence_of_sizes_is_not_taken_for_a_flattened_conv():
    "conv → conv → mean over positions → Linear, where the first conv's output size happens to equal the Linear's width: plain crop, with a warning."
    class M(nn.Module):
        def __init__(s, c0, c1):
            super().__init__(); s.c0 = nn.Conv1d(1, c0, 3, padding=1); s.c1 = nn.Conv1d(c0, c1, 3, padding=1); s.fc = nn.Linear(c1, 3)
        def forward(s, x): return s.fc(s.c1(s.c0(x)).mean(-1))
    T, S = M(5, 40), M(2, 16)  # 5·8 = 40 = c1 of the teacher, 2·8 = 16 = c1 of the student
    tp = {k: v.detach() for k, v in T.named_parameters()}
    x = torch.zeros(2, 1, 8)
    assert flatten_layout(S, x) == {"fc.weight": None}
    with pytest.warns(UserWarning, match="cannot tell whether 'fc.weight'"): out = crop_params(tp, S, x)
    assert torch.equal(out['fc.weight'], tp['fc.weight'][:, 12:28])  # the plain centre crop, as the conv's kept channels 12..27
    # a shape-preserving module on the flat features is looked through: conv → flatten → dropout → Linear keeps its layout
    mk = lambda c: nn.Sequential(nn.Conv1d(2, c, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.1), nn.Linear(c * 6, 5))
    Tm, Sm = mk(8), mk(3)
    tp = {k: v.detach() for k, v in Tm.named_parameters()}
    out = crop_params(tp, Sm, torch.zeros(2, 2, 8))
    assert torch.equal(out['4.weight'], tp['4.weight'].reshape(5, 8, 6)[:, 2:5].reshape(5, 18))
