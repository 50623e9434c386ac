"`HessianOperator.to_dense` computed block by block (one module's columns at a time, earlier parameters held fixed) against dense float64 `torch.func.hessian` references (issue 3)."
import pytest, torch
from torch import nn
import fastcore.test as fct
from fastsprkd.core import HessianOperator
from fastsprkd.curvature.hessian import _module_groups
from fastsprkd.models import SeedCNN
from test_core import reference, close, make_data, mlp, cnn, CE, F64


class Reversed(nn.Module):
    "Parameters registered in the reverse of the forward order: the blocks then save nothing, but must stay exact."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.out, self.mid, self.inp = nn.Linear(5, 3), nn.Linear(5, 5), nn.Linear(4, 5)
    def forward(self, x): return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))

@pytest.mark.parametrize('mode', ['auto', 'fwd', 'rev'])
def test_blocks_exact_any_order(mode):
    x, y = make_data('mlp', n=15)
    for model in (Reversed().double(), mlp(bn=True, drop=True)):
        H, _, _ = reference(model, CE, [(x, y)])
        op = HessianOperator(model, CE, [(x[:6], y[:6]), (x[6:], y[6:])], mode=mode)   # two batches of unequal size
        D = op.to_dense()
        close(D, H)
        assert torch.equal(D, D.T)
        fct.test_eq(op.num_matvecs, op.num_params)

def test_blocks_seed_cnn_float64():
    "SPEC §1-B's network (small images, few samples): the block of the final layer is exact, also with a parameter subset."
    torch.manual_seed(0)
    model = SeedCNN(side=10).double()
    x, y = torch.randn(12, 1, 10, 10, dtype=F64), torch.randint(0, 10, (12,))
    nll = nn.NLLLoss()
    op = HessianOperator(model, nll, (x, y))
    fct.test_eq(_module_groups(op), [(0, 2), (2, 2)])   # conv (weight, bias), fc (weight, bias)
    H, _, _ = reference(model, nll, [(x, y)])
    close(op.to_dense(), H)
    names = ['conv.bias', 'fc.weight']
    sub = HessianOperator(model, nll, (x, y), params=names, mode='fwd', memory_budget=1)   # one column per chunk
    close(sub.to_dense(), reference(model, nll, [(x, y)], names=names)[0])

def test_blocks_train_mode_batchnorm():
    model, (x, y) = cnn(bn=True), make_data('cnn', n=10)
    model.train()
    H, _, _ = reference(model, CE, [(x, y)], eval_mode=False)
    close(HessianOperator(model, CE, (x, y), eval_mode=False).to_dense(), H)
    assert model.training


def test_auto_times_each_mode_twice():
    "mode='auto' keeps the faster of two timings per mode (the first carries one-time costs); the products stay exact."
    model, (x, y) = mlp(), make_data('mlp')
    op = HessianOperator(model, CE, (x, y))
    calls = []
    def fn(a): calls.append(a); return a * 2
    out, t = op._time(fn, 3)
    fct.test_eq(out, 6); fct.test_eq(len(calls), 2); assert t >= 0
    H, _, _ = reference(model, CE, [(x, y)])
    v = torch.randn(H.shape[0], dtype=F64)
    close(op.matvec(v), H @ v)
    assert op._auto[False] in ('fwd', 'rev')
    fct.test_eq(op.num_matvecs, 1)
