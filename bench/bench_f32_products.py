"""Float32 Hessian-vector products against the float64 model's: fastsprkd's HessianOperator and curvlinops'
HessianLinearOperator on the same batches (BENCHMARKS "Float32 Hessian-vector products").

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_f32_products.py

Per benchmark network (bench/common.bench_models, the first two): the largest relative error ‖H₃₂v − H₆₄v‖/‖H₆₄v‖ over 4
random vectors, for fastsprkd's modes (rev/fwd, kept graph or not) and curvlinops, on one batch and on batches of 128;
then, on the seed CNN, at the float64 top eigenvector v₁ (one batch), |v₁ᵀH₃₂v₁ − λ₁| and ‖H₃₂v₁ − λ₁v₁‖/λ₁ for both, and the relative
errors of fastsprkd's `eigsh(k=5, tol=1e-8)` on the float32 model."""
import copy, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_models, machine
from fastsprkd.core import HessianOperator
from fastsprkd.eigen import eigsh
from curvlinops import HessianLinearOperator

if __name__ == '__main__':
    torch.set_num_threads(1)
    print(machine())
    for name, model, x, y, lf in bench_models()[:2]:
        model.eval()
        m64 = copy.deepcopy(model).double()
        n = sum(p.numel() for p in model.parameters())
        V = torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        op64 = HessianOperator(m64, lf, (x.double(), y), mode='rev')
        ref = op64.matmat(V)
        def rel(a): return ((a.double() - ref).norm(dim=0) / ref.norm(dim=0)).max().item()
        bs = [(x[i:i+128], y[i:i+128]) for i in range(0, len(x), 128)]
        params = list(model.parameters())
        out = {f'fastsprkd {m}, kept graph {c}': rel(HessianOperator(model, lf, (x, y), mode=m, cache_graph=c).matmat(V.float()))
               for m in ('rev', 'fwd') for c in (True, False)}
        out['fastsprkd, batches of 128'] = rel(HessianOperator(model, lf, bs, mode='rev').matmat(V.float()))
        cl1 = HessianLinearOperator(model, lf, params, [(x, y)], progressbar=False, check_deterministic=False)
        out['curvlinops, one batch'] = rel(torch.as_tensor(cl1 @ V.float()))
        out['curvlinops, batches of 128'] = rel(torch.as_tensor(HessianLinearOperator(model, lf, params, bs, progressbar=False, check_deterministic=False) @ V.float()))
        print(name)
        for k, v in out.items(): print(f'  H·V relative error, {k}: {v:.2e}')
        if n > 4096: continue  # the eigenvector part needs the dense float64 Hessian (seed CNN only)
        ev, U = torch.linalg.eigh(op64.to_dense())
        v1, lam = U[:, -1:], ev[-1].item()
        ours = HessianOperator(model, lf, (x, y))
        for nm, f in (('fastsprkd', lambda W: ours.matmat(W.float()).double()), ('curvlinops', lambda W: torch.as_tensor(cl1 @ W.float()).double())):
            Hv = f(v1)
            print(f'  at v1: {nm} |v1ᵀHv1 − λ1| = {abs((v1.T @ Hv).item() - lam):.2e}, ‖Hv1 − λ1v1‖/λ1 = {((Hv - lam * v1).norm() / lam).item():.2e}')
        e, t = eigsh(ours, k=5, tol=1e-8).eigenvalues.flip(0), ev[-5:].flip(0)
        print('  fastsprkd eigsh top-5 relative errors:', ', '.join(f'{v:.1e}' for v in ((e - t).abs() / t).tolist()))
