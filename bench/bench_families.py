"""Transformers and ViTs (issue 15): HVP ÷ gradient through attention, next to PyHessian and curvlinops in the same run,
and the peak memory of the math-kernel product vs a gradient.

    nice -n 10 .venv/bin/python bench/bench_families.py [hvp|memory|all] [--repeat 5]

hvp:    time of one Hessian-vector product ÷ one plain `torch.autograd.grad` of the same batch with PyTorch's default
        attention kernel (flash attention on CPU): the median over `--repeat` rounds (after a warm-up round) of the ratio
        within a round, each round timing every call once in turn (the same load for all); also the gradient under the
        math kernel. HessianOperator needs nothing from the user; PyHessian and curvlinops fail on these models with the
        default kernel ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"):
        they run inside `fastsprkd.core.differentiable_attention()` (math kernel, MHA fast path off).
memory: peak memory growth of one call in a fresh process (Linux VmHWM after a reset through /proc/self/clear_refs,
        the call run once before on 2 samples so that lazily loaded code and one-time state are not counted), for a
        gradient (default kernel), a gradient under the math kernel, one product per mode (no kept graph) and PyHessian's
        gradient graph plus one product (math kernel, the same double backward without the operator); also on a
        long-sequence transformer (8 sequences of 512 tokens), where the math kernel's attention matrix shows.
"""
import argparse, json, re, subprocess, sys
import torch
from torch import nn
from common import save, table, machine
from fastsprkd.core import HessianOperator, differentiable_attention

torch.set_num_threads(min(2, torch.get_num_threads()))


class TextTransformer(nn.Module):
    "Token + learned position embeddings, nn.TransformerEncoder (post-norm, ReLU, no dropout), mean pooling, linear head."
    def __init__(self, vocab=1000, d=64, heads=4, layers=2, ff=256, ctx=512, classes=2):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.02 * torch.randn(1, ctx, d))
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True), layers,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)
    def forward(self, x): return self.head(self.enc(self.emb(x) + self.pos[:, :x.shape[1]]).mean(1))


def setup(name):
    "(description, model, x, y, loss) of a benchmark case, seeded."
    torch.manual_seed(0)
    lf = nn.CrossEntropyLoss()
    if name.startswith('transformer'):
        B, L = (64, 32) if name == 'transformer' else (8, 512)
        m = TextTransformer()
        x, y = torch.randint(0, 1000, (B, L)), torch.randint(0, 2, (B,))
        desc = f"transformer classifier (2 layers, d_model 64, {sum(p.numel() for p in m.parameters()):,} params), {B} seqs × {L} tokens"
    else:
        import timm
        patch, B = (16, 64) if name == 'vit16' else (4, 16)
        m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=patch, num_classes=10)
        x, y = torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,))
        desc = (f"timm vit_tiny (patch {patch}, {(32 // patch) ** 2 + 1} tokens, {sum(p.numel() for p in m.parameters()):,} "
                f"params), {B} imgs 32×32")
    return desc, m.eval(), x, y, lf


def plain_grad(model, lf, x, y):
    ps = list(model.parameters())
    return lambda: torch.autograd.grad(lf(model(x), y), ps)


def in_math(fn):
    def g():
        with differentiable_attention(): return fn()
    return g


def pyhessian_hvp(model, lf, x, y):
    "PyHessian's HVP (its gradient graph built once at construction, one double backward per product), math kernel."
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product
    with differentiable_attention(): h = hessian(model, lf, data=(x, y), cuda=False)
    v = [torch.randn_like(p) for p in h.params]
    return in_math(lambda: hessian_vector_product(h.gradsH, h.params, v))


def curvlinops_hvp(model, lf, x, y):
    "curvlinops' HessianLinearOperator @ v (torch.func, the batch's graph rebuilt per product), math kernel."
    from curvlinops import HessianLinearOperator
    ps = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, lf, ps, [(x, y)], check_deterministic=False)
    v = torch.randn(sum(p.numel() for p in ps))
    return in_math(lambda: H @ v)


def interleaved(fns, repeat):
    """Median seconds of each callable and median ratio to the first, timed in `repeat` rounds that run each callable
    once in turn (after one warm-up round): on a shared machine every ratio compares calls made under the same load."""
    import statistics, time
    for f in fns.values(): f()
    ts = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
    base = next(iter(ts.values()))
    return {k: (statistics.median(v), statistics.median(a / b for a, b in zip(v, base))) for k, v in ts.items()}


def bench_hvp(repeat):
    rows = []
    for case in ('transformer', 'vit16', 'vit4'):
        desc, model, x, y, lf = setup(case)
        fns = {'grad': plain_grad(model, lf, x, y), 'grad, math kernel': in_math(plain_grad(model, lf, x, y))}
        ops = {}
        for mode, cache in (('fwd', False), ('rev', False), ('rev', True), ('auto', True)):
            op = HessianOperator(model, lf, (x, y), mode=mode, cache_graph=cache)
            v = torch.randn(op.num_params)
            k = mode + ('+cache' if cache and mode == 'rev' else '')
            ops[k], fns[k] = op, (lambda op=op, v=v: op.matvec(v))
        fns['PyHessian (graph kept)'] = pyhessian_hvp(model, lf, x, y)
        fns['curvlinops'] = curvlinops_hvp(model, lf, x, y)
        res = interleaved(fns, repeat)
        r = {'model': desc, 'grad ms (default kernel)': f"{res['grad'][0]*1e3:.0f}"}
        for k, (t, ratio) in list(res.items())[1:]:
            r[k] = f"{ratio:.2f}x" + (f" ({ops['auto']._auto.get(False)})" if k == 'auto' else '')
        rows.append(r); print(r, flush=True)
    print(table(rows, list(rows[0])))
    return rows


def _mem_kb():
    st = open('/proc/self/status').read()
    return {k: int(re.search(k + r':\s+(\d+)', st).group(1)) for k in ('VmRSS', 'VmHWM')}


def _mem_fn(model, lf, x, y, what):
    if what == 'grad': return plain_grad(model, lf, x, y)
    if what == 'grad_math': return in_math(plain_grad(model, lf, x, y))
    if what == 'pyhessian':  # its construction (the gradient graph) and one product, math kernel
        from pyhessian.utils import hessian_vector_product
        ps = list(model.parameters())
        v = [torch.randn_like(p) for p in ps]
        def fn():
            with differentiable_attention():
                gs = torch.autograd.grad(lf(model(x), y), ps, create_graph=True)
                return hessian_vector_product(gs, ps, v)
        return fn
    op = HessianOperator(model, lf, (x, y), mode=what[4:], cache_graph=False)
    v = torch.randn(op.num_params)
    return lambda: op.matvec(v)


def _mem_child(case, what):
    "In a fresh process: run `what` once on 2 samples, reset the peak RSS, run it on the batch, print the growth (MiB)."
    desc, model, x, y, lf = setup(case)
    _mem_fn(model, lf, x[:2], y[:2], what)()
    fn = _mem_fn(model, lf, x, y, what)
    open('/proc/self/clear_refs', 'w').write('5')
    before = _mem_kb()['VmRSS']
    fn()
    print(json.dumps(dict(peak_mib=(_mem_kb()['VmHWM'] - before) / 1024)))


def _mem(case, what):
    cmd = [sys.executable, __file__, '_mem', case, what]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])['peak_mib']


def bench_memory():
    rows = []
    for case in ('transformer', 'transformer_long', 'vit16', 'vit4'):
        g = _mem(case, 'grad')
        r = {'model': setup(case)[0], 'grad MiB (default kernel)': f"{g:.1f}"}
        for what, col in (('grad_math', 'grad, math kernel'), ('hvp_fwd', 'HVP fwd'), ('hvp_rev', 'HVP rev'),
                          ('pyhessian', 'PyHessian HVP')):
            m = _mem(case, what)
            r[f'{col} MiB (÷ grad)'] = f"{m:.1f} ({m/g:.2f}x)"
        rows.append(r); print(r, flush=True)
    print(table(rows, list(rows[0])))
    return rows


if __name__ == '__main__':
    if sys.argv[1:2] == ['_mem']: _mem_child(*sys.argv[2:4]); sys.exit()
    ap = argparse.ArgumentParser()
    ap.add_argument('which', nargs='?', default='all', choices=['hvp', 'memory', 'all'])
    ap.add_argument('--repeat', type=int, default=5)
    a = ap.parse_args()
    print(machine(), flush=True)
    if a.which in ('hvp', 'all'): print(f"results in {save('families_hvp', bench_hvp(a.repeat))}")
    if a.which in ('memory', 'all'): print(f"results in {save('families_memory', bench_memory())}")
