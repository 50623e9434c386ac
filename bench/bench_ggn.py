"""GGN and Fisher products (issue 16): product time ÷ one plain `torch.autograd.grad` of the same batch, for fastsprkd's
GGNOperator, EFOperator (one product with K=1: per-sample gradients, the whole cost), a one-sample FisherMCOperator and the
Hessian (HessianOperator, default settings: mode='auto', kept graph), next to curvlinops' GGNLinearOperator in the same run;
"GGN, forward-mode J·V" is the same GGNOperator with its linearized trace turned off (the A/B of issue 16's change).

    nice -n 10 .venv/bin/python bench/bench_ggn.py [--repeat 5] [--models digits,transformer,resnet18] [--warmup 20]

The GGN and the MC Fisher first make `--warmup` products with their vector (the regime of an eigensolver's dozens of
products on one kept graph: their J·V runs through a linearized trace from the 17th call on), the other operators two;
the slowest warm-up product of the GGN (the one that builds the trace) is printed. Then interleaved rounds (`bench_families.interleaved`): every call once per
round, the median of the per-round ratios.
Attention models run curvlinops inside `differentiable_attention()` (math kernel), fastsprkd's operators by themselves.
"""
import argparse, sys, os
import torch
from torch import nn
sys.path.insert(0, os.path.dirname(__file__))
from common import save, table, machine, digits_tensors
from bench_families import setup, plain_grad, in_math, interleaved
from fastsprkd.core import HessianOperator, GGNOperator, EFOperator, FisherMCOperator

torch.set_num_threads(min(2, torch.get_num_threads()))


def curvlinops_ggn(model, lf, x, y):
    from curvlinops import GGNLinearOperator
    ps = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad(): G = GGNLinearOperator(model, lf, ps, [(x, y)], check_deterministic=False)
    v = torch.randn(sum(p.numel() for p in ps))
    return in_math(lambda: G @ v)


def cases(names=('digits', 'transformer')):
    for name in names:
        torch.manual_seed(0)
        if name == 'digits':
            from fastsprkd.models import DigitsCNN
            x, y = digits_tensors(512)
            m = DigitsCNN(32).eval()
            yield f"digits CNN ({sum(p.numel() for p in m.parameters()):,} params), 512 imgs", m, x, y, nn.CrossEntropyLoss()
        elif name == 'resnet18':  # torchvision ResNet-18 (pretrained=False), eval-mode BatchNorm, batch 32 at 3×32×32
            from torchvision.models import resnet18
            m = resnet18(num_classes=10).eval()
            x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
            yield f"ResNet-18 ({sum(p.numel() for p in m.parameters()):,} params), batch 32 at 32×32", m, x, y, nn.CrossEntropyLoss()
        else: yield setup(name)


def bench(repeat, models, warmup=20):
    import time
    rows = []
    for desc, model, x, y, lf in cases(models):
        fns = {'grad': plain_grad(model, lf, x, y)}
        for name, cls, kw in (('Hessian (auto)', HessianOperator, {}), ('GGN', GGNOperator, {}),
                              ('GGN, forward-mode J·V', GGNOperator, {}), ('EF', EFOperator, {}),
                              ('MC Fisher (1 sample)', FisherMCOperator, dict(mc_samples=1))):
            op = cls(model, lf, (x, y), **kw)
            if name == 'GGN, forward-mode J·V': op._lin_ok = False  # the same GGN without the linearized trace (A/B)
            v = torch.randn(op.num_params)
            fns[name] = lambda op=op, v=v: op.matvec(v)
            ws = []
            for _ in range(warmup if cls in (GGNOperator, FisherMCOperator) else 2):
                t0 = time.perf_counter(); op.matvec(v); ws.append(time.perf_counter() - t0)
            if name == 'GGN' and ws:
                print(f"  GGN warm-up: {len(ws)} products, slowest {max(ws)*1e3:.0f} ms (call {ws.index(max(ws)) + 1}), "
                      f"last {ws[-1]*1e3:.0f} ms; linearized J·V in use: {bool(op._lin and op._lin[5] == 2)}", flush=True)
        fns['curvlinops GGN'] = curvlinops_ggn(model, lf, x, y)
        res = interleaved(fns, repeat)
        r = {'model': desc, 'grad ms': f"{res['grad'][0]*1e3:.0f}"}
        for k, (t, ratio) in list(res.items())[1:]: r[k] = f"{ratio:.2f}x"
        rows.append(r); print(r, flush=True)
    print(table(rows, list(rows[0])))
    return rows


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--repeat', type=int, default=5)
    ap.add_argument('--models', default='digits,transformer', help="comma-separated: digits, transformer, resnet18")
    ap.add_argument('--warmup', type=int, default=20, help="products of the GGN and MC Fisher before the timed rounds")
    a = ap.parse_args()
    print(machine(), flush=True)
    print(f"results in {save('ggn', bench(a.repeat, a.models.split(','), a.warmup))}")
