"""When do influence functions predict leave-one-out (LOO) retraining on a non-convex CNN? (issue 17)

    OMP_NUM_THREADS=1 .venv/bin/python bench/influence_loo.py [--configs 2:5e-3,2:1e-3,4:1e-2,4:5e-3,4:1e-3]

The procedure of tests/test_influence_loo.py (the acceptance test, width 2 and weight decay 5e-3; its `Problem` is used
here), repeated for CNNs of other widths w (Conv(1→w)–tanh–pool–Conv(w→2w)–tanh–pool–Linear(4w→10)) and weight decays
WD: full-batch training of mean cross-entropy + (WD/2)·‖θ‖² on 1,400 digits to a strict local minimum (Newton polish),
two test points (97th/90th percentile of the test loss), the 30 training points of largest |influence| of the
documented configuration `influence(..., damping=WD)` each removed and the model retrained from the optimum by BFGS
started from the exact LOO Hessian, Pearson r of −I/N against the actual change of the test loss. Reported per
configuration: parameters, test accuracy, λ_min of the objective's Hessian H, the smallest λ_min of the LOO objectives'
Hessians at the optimum (negative: removing that point leaves no minimum nearby, the removal is not local) and how many
were indefinite, the worst retraining's max |∇|, and r for three configurations on the same points: `damping=WD`
(exact Hessian of the objective), `damping=None` (the spectrum rule) and `curvature='ekfac', damping=WD`.
"""
import argparse, os, sys, time
import torch
from torch import nn
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here); sys.path.insert(0, os.path.join(here, '..', 'tests'))
from common import save, table, machine
from test_influence_loo import Problem
from fastsprkd.analysis import influence


def run(width, wd):
    t0 = time.perf_counter()
    pb = Problem(wd=wd, width=width).train()
    js = pb.test_points()
    with torch.no_grad(): acc = (pb.model(pb.Xte).argmax(1) == pb.Yte).double().mean().item()
    test, lf = (pb.Xte[js], pb.Yte[js]), nn.CrossEntropyLoss()
    cfg = {'damping=WD': dict(damping=wd), 'damping rule': dict(), 'EK-FAC, damping=WD': dict(curvature='ekfac', damping=wd)}
    S = {k: influence(pb.model, lf, (pb.Xtr, pb.Ytr), test, **kw).scores for k, kw in cfg.items()}
    tops, actual, gmax, lm = pb.loo(S['damping=WD'], js)
    row = dict(width=width, wd=wd, params=len(pb.theta), test_acc=round(acc, 3), lmin_H=f'{torch.linalg.eigvalsh(pb.H)[0].item():.1e}',
               lmin_loo=f'{min(lm):.1e}', indefinite=sum(v <= 0 for v in lm), loo_gmax=f'{gmax:.1e}', seconds=round(time.perf_counter() - t0))
    for k, s in S.items(): row[f'r {k}'] = ' / '.join(f'{v:.3f}' for v in pb.r(s, tops, actual))
    print(row, flush=True)
    return row


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--configs', default='2:5e-3,2:1e-3,4:1e-2,4:5e-3,4:1e-3')
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [run(int(w), float(d)) for w, d in (c.split(':') for c in a.configs.split(','))]
    cols = ['width', 'wd', 'params', 'test_acc', 'lmin_H', 'lmin_loo', 'indefinite', 'loo_gmax', 'r damping=WD', 'r damping rule', 'r EK-FAC, damping=WD', 'seconds']
    print(f'\n{machine()}, load {os.getloadavg()}\n' + table(rows, cols))
    print(save('influence_loo', dict(args=vars(a), rows=rows)))
