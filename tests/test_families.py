"""Model families of issue 15: attention (`F.scaled_dot_product_attention`, `nn.TransformerEncoder` and its fused fast
path, timm ViTs, a GPT-style LM with tied embeddings) and embeddings with `padding_idx`, exact in every mode against dense
float64 references built independently with torch.func; the fwd/rev guard; `auto` surfacing the user's own errors."""
import math, warnings
import pytest, torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacfwd, jacrev
from torch.nn.attention import sdpa_kernel, SDPBackend
from conftest import CUDA
from fastsprkd.core import HessianOperator

F64 = torch.float64
CE = nn.CrossEntropyLoss()
MODES = ('fwd', 'rev', 'auto')
# a disagreement between fwd and rev on a model that has none is a bug of the guard: an error in these tests
pytestmark = pytest.mark.filterwarnings("error:forward-over-reverse and reverse-over-reverse")


# ---------------------------------------------------------------- references and state
def reference(model, loss_func, xb, yb, fwd=True):
    """Dense Hessian of `loss_func(model(*xb), *yb)` w.r.t. all parameters (flattened in `named_parameters` order) in
    the model's current mode, with attention on the math kernel and the fused MHA fast path off (the function that
    training differentiates): `jacrev(grad(f))`, checked against `jacfwd(grad(f))` unless `fwd=False` (forward mode wrong
    there). Not `torch.func.hessian` (jacfwd∘jacrev): in torch 2.14 it is wrong on `nn.MultiheadAttention` (0.07 off a
    finite difference of the gradient on `Encoder`; nested vmap levels), while both of these match it (see
    `test_reference_matches_finite_differences`)."""
    names, ps = zip(*model.named_parameters())
    sizes, shapes = [p.numel() for p in ps], [p.shape for p in ps]
    bufs = dict(model.named_buffers())
    def f(flat):
        d = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
        return loss_func(functional_call(model, ({**bufs, **d},), xb), *yb)
    theta = torch.cat([p.detach().reshape(-1) for p in ps])
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            H = jacrev(grad(f))(theta).detach()
            if fwd:
                H2 = jacfwd(grad(f))(theta)
                assert (H - H2).abs().max() <= 1e-12 * max(1., H.abs().max()), "the two torch.func references disagree"
            return H
    finally: torch.backends.mha.set_fastpath_enabled(fast)

def global_attention_state():
    "The user's global attention settings that the operator must leave as they were."
    b = torch.backends
    return (b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled(),
            b.cuda.cudnn_sdp_enabled(), b.mha.get_fastpath_enabled())

def snapshot(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [t.detach().clone() for t in [*model.parameters(), *model.buffers()]], global_attention_state())

def assert_same_state(model, snap):
    modes, flags, grads, values, attn = snap
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
    for t, s in zip([*model.parameters(), *model.buffers()], values): assert torch.equal(t, s)
    assert global_attention_state() == attn

def assert_exact(H, ref, tol=1e-10):
    err = (H - ref).abs().max().item() / max(1., ref.abs().max().item())
    assert err <= tol, f"max relative error {err:.2e}"

def check_all_modes(model, loss_func, xb, yb, eval_mode=True, n_inp=None):
    "to_dense and matvec in fwd, rev and auto equal the reference; the model's state and the global settings unchanged."
    for p in model.parameters(): p.grad = torch.full_like(p, 0.5)  # an existing .grad must survive
    with torch.no_grad(): was = model.training; model.train(not eval_mode)
    ref = reference(model, loss_func, xb, yb)
    model.train(was)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    snap = snapshot(model)
    v = torch.randn(ref.shape[0], dtype=F64, generator=torch.Generator().manual_seed(3))
    for mode in MODES:
        op = HessianOperator(model, loss_func, (*xb, *yb), mode=mode, eval_mode=eval_mode,
                             n_inp=len(xb) if n_inp is None else n_inp)
        assert op.num_params == ref.shape[0]
        assert_exact(op.matvec(v), ref @ v)
        assert_exact(op.to_dense(), ref)
        assert_same_state(model, snap)
    return ref


# ---------------------------------------------------------------- models
class Encoder(nn.Module):
    "nn.TransformerEncoder (1 layer, d_model 8, 2 heads) on embedded tokens, mean-pooled into 3 classes (about 700 parameters)."
    def __init__(self, seed=0, mask=None):
        super().__init__()
        torch.manual_seed(seed)
        self.mask = mask
        self.emb = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)  # eval mode: the fused fast path
        self.head = nn.Linear(8, 3)
    def forward(self, x, pad=None):
        L = x.shape[1]
        kw = {}
        if self.mask in ('causal', 'is_causal'): kw['mask'] = nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype, device=x.device)
        if self.mask == 'is_causal': kw['is_causal'] = True
        h = self.enc(self.emb(x), src_key_padding_mask=pad, **kw)
        return self.head(h.mean(1))

def encoder_batch(pad=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 5, 3, dtype=F64, generator=g), torch.randint(0, 3, (4,), generator=g)
    if not pad: return (x,), (y,)
    m = torch.zeros(4, 5, dtype=torch.bool); m[0, 3:] = m[2, 1:] = True
    return (x, m), (y,)

class SDPABlock(nn.Module):
    "A hand-written pre-norm attention block calling F.scaled_dot_product_attention, with an optional boolean or additive mask."
    def __init__(self, d=8, heads=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.h, self.norm, self.qkv, self.proj, self.head = heads, nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)
    def forward(self, x, mask=None):
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, L, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return self.head(torch.tanh(x).mean(1))

class GPT(nn.Module):
    "A GPT-style causal LM: token + position embeddings, one pre-norm causal SDPA block with an MLP, LM head tied to the token embedding."
    def __init__(self, vocab=7, d=8, ctx=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.lnf, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.tok.weight  # tied
    def forward(self, idx):
        B, L = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(L))
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, 2, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, -1))
        x = x + self.mlp(self.ln2(x))
        return self.lm_head(self.lnf(x))

def lm_loss(logits, y): return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

def tiny_vit(seed=0, **kw):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2,
                             mlp_ratio=1., **kw).double()


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize('eval_mode', [True, False], ids=['eval', 'train'])
@pytest.mark.parametrize('mask', [None, 'causal', 'is_causal', 'padding'])
def test_transformer_encoder(mask, eval_mode):
    model = Encoder(mask=None if mask == 'padding' else mask).double()
    xb, yb = encoder_batch(pad=mask == 'padding')
    check_all_modes(model, CE, xb, yb, eval_mode=eval_mode)

def test_reference_matches_finite_differences():
    "The references themselves: a central finite difference of the (autograd) gradient, on the encoder with padding."
    model = Encoder().double().eval()
    xb, yb = encoder_batch(pad=True)
    ref = reference(model, CE, xb, yb)
    v = torch.randn(ref.shape[0], dtype=F64, generator=torch.Generator().manual_seed(7))
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    g = lambda t: HessianOperator(model, CE, (*xb, *yb), n_inp=2, at=t, validate=False).gradient()
    fd = (g(theta + 1e-5 * v) - g(theta - 1e-5 * v)) / 2e-5
    assert (ref @ v - fd).abs().max() <= 1e-7 * fd.abs().max()

def test_encoder_fast_path_is_off_inside_products():
    """In eval mode with a key-padding mask, nn.TransformerEncoder's fused fast path turns the input into a nested tensor
    and returns zeros at padded positions, unlike the differentiable path: a block of to_dense whose earlier parameters
    are held fixed (no grad needed there) would take it and be the Hessian of another function. Inside the operator the
    fast path is off: the head's block (encoder fixed) equals the full Hessian's block."""
    model = Encoder().double().eval()
    xb, yb = encoder_batch(pad=True)
    with torch.no_grad():  # outside the operator, the user's fast path still runs and differs at the padded positions
        fast = model.enc(model.emb(xb[0]), src_key_padding_mask=xb[1])
        torch.backends.mha.set_fastpath_enabled(False)
        try: slow = model.enc(model.emb(xb[0]), src_key_padding_mask=xb[1])
        finally: torch.backends.mha.set_fastpath_enabled(True)
    assert (fast - slow).abs().max() > 1e-3
    ref = reference(model, CE, xb, yb)
    op = HessianOperator(model, CE, (*xb, *yb), params=model.head, n_inp=2)
    assert_exact(op.to_dense(), ref[-27:, -27:])
    assert_exact(HessianOperator(model, CE, (*xb, *yb), n_inp=2).loss(), CE(model.head(slow.mean(1)), yb[0]))

@pytest.mark.parametrize('mask', [None, 'bool', 'additive'])
def test_sdpa_block(mask):
    model = SDPABlock().double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 5, 8, dtype=F64, generator=g), torch.randint(0, 3, (3,), generator=g)
    m = None
    if mask is not None:
        m = torch.rand(5, 5, generator=g) > 0.3
        m.fill_diagonal_(True)
        if mask == 'additive': m = torch.zeros(5, 5, dtype=F64).masked_fill(~m, -math.inf)
    check_all_modes(model, CE, (x,) if m is None else (x, m), (y,))

@pytest.mark.parametrize('eval_mode', [True, False], ids=['eval', 'train'])
def test_timm_vit(eval_mode):
    model = tiny_vit()
    assert model.blocks[0].attn.fused_attn  # timm calls F.scaled_dot_product_attention
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 1, 8, 8, dtype=F64, generator=g), torch.randint(0, 3, (4,), generator=g)
    check_all_modes(model, CE, (x,), (y,), eval_mode=eval_mode)

def test_timm_vit_tiny_32px_matvec():
    """timm's vit_tiny_patch16_224 at 32×32 (5.5M parameters: no dense reference): the product in each mode equals a
    central finite difference of the gradient, and the modes agree with each other."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, num_classes=3).double()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(1, 3, 32, 32, dtype=F64, generator=g), torch.randint(0, 3, (1,), generator=g)
    snap = snapshot(model)
    ops = {m: HessianOperator(model, CE, (x, y), mode=m) for m in MODES}
    op = ops['rev']
    v = torch.randn(op.num_params, dtype=F64, generator=g)
    v /= v.norm()
    theta = op.flatten([p.detach() for p in op.params])
    h = 1e-4
    grad_at = lambda t: HessianOperator(model, CE, (x, y), at=t, validate=False).gradient()
    fd = (grad_at(theta + h * v) - grad_at(theta - h * v)) / (2 * h)
    hv = {m: o.matvec(v) for m, o in ops.items()}
    for m in MODES:
        assert (hv[m] - fd).norm() <= 1e-6 * fd.norm(), m
        assert (hv[m] - hv['rev']).norm() <= 1e-10 * hv['rev'].norm(), m
    assert_same_state(model, snap)

def test_gpt_tied_embeddings():
    model = GPT().double()
    assert model.lm_head.weight is model.tok.weight
    g = torch.Generator().manual_seed(6)
    seq = torch.randint(0, 7, (3, 6), generator=g)
    ref = check_all_modes(model, lm_loss, (seq[:, :-1],), (seq[:, 1:],))
    assert ref.shape[0] == sum(p.numel() for p in model.parameters())  # the tied weight counted once


# ---------------------------------------------------------------- the user's attention settings
def test_global_attention_settings_unchanged_also_on_error():
    model = SDPABlock().double()
    x, y = torch.randn(2, 4, 8, dtype=F64), torch.tensor([0, 2])
    calls = []
    def loss(out, y):
        calls.append(1)
        if len(calls) == 3: raise RuntimeError("the user's loss failed")
        return CE(out, y)
    before = global_attention_state()
    op = HessianOperator(model, loss, (x, y), mode='rev', cache_graph=False)
    with pytest.raises(RuntimeError, match="the user's loss failed"): op.matvec(torch.ones(op.num_params, dtype=F64)); op.matvec(torch.ones(op.num_params, dtype=F64))
    assert global_attention_state() == before
    # inside the user's own kernel choice: theirs again after each product
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        inside = global_attention_state()
        HessianOperator(model, CE, (x, y)).matvec(torch.ones(op.num_params, dtype=F64))
        assert global_attention_state() == inside and not torch.backends.cuda.math_sdp_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        HessianOperator(model, CE, (x, y)).to_dense()
        assert not torch.backends.mha.get_fastpath_enabled()
    finally: torch.backends.mha.set_fastpath_enabled(True)
    assert global_attention_state() == before

@pytest.mark.skipif(not CUDA, reason="CUDA test: no GPU on this machine")
def test_attention_cuda_float32():
    "On CUDA in float32 SDPA would pick a fused kernel (no second derivatives): every mode works and matches float64."
    model = Encoder(mask='is_causal').double()
    xb, yb = encoder_batch()
    ref = reference(model.eval(), CE, xb, yb)
    m32 = model.float().cuda()
    xb32, yb32 = tuple(t.float().cuda() for t in xb), tuple(t.cuda() for t in yb)
    before = global_attention_state()
    for mode in MODES:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # float32 rounding may make the guard prefer rev
            H = HessianOperator(m32, CE, (*xb32, *yb32), mode=mode).to_dense().double().cpu()
        assert (H - ref).abs().max() <= 1e-4 * ref.abs().max(), mode
    assert global_attention_state() == before


# ---------------------------------------------------------------- embeddings and the fwd/rev guard
def embedding_model(**kw):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(6, 3, **kw), nn.Flatten(), nn.Linear(6, 2)).double()

IDX, TGT = torch.tensor([[0, 1], [2, 0], [3, 3], [0, 5]]), torch.tensor([0, 1, 1, 0])

def test_embedding_padding_idx():
    """fwd through Embedding(padding_idx) is wrong (PyTorch's forward-mode derivative of the embedding backward ignores
    the padding row; torch.func's forward-over-reverse is wrong too): the reference is jacrev(grad) alone.
    mode='fwd' refuses, naming the module; rev and auto are exact and never take the fwd path."""
    model = embedding_model(padding_idx=0)
    ref = reference(model, CE, (IDX,), (TGT,), fwd=False)
    assert (ref - ref.T).abs().max() <= 1e-15 and ref[:3].abs().max() == 0  # symmetric; the padding row has no curvature
    with pytest.raises(AssertionError, match='disagree'): reference(model, CE, (IDX,), (TGT,))  # forward mode is wrong here
    with pytest.raises(ValueError, match=r"module '0' \(Embedding with padding_idx=0\).*mode='rev'"):
        HessianOperator(model, CE, (IDX, TGT), mode='fwd')
    snap = snapshot(model)
    for mode in ('rev', 'auto'):
        op = HessianOperator(model, CE, (IDX, TGT), mode=mode)
        assert_exact(op.to_dense(), ref)
        v = torch.randn(op.num_params, 3, dtype=F64)
        assert_exact(op.matmat(v), ref @ v); assert_exact(op.matvec(v[:, 0]), ref @ v[:, 0])
        assert not op._fwd_ok and op._auto.get(False, 'rev') == 'rev'
    assert_same_state(model, snap)
    # the padding embedding frozen (not differentiated): nothing to refuse, fwd is exact
    op = HessianOperator(model, CE, (IDX, TGT), params=model[2], mode='fwd')
    assert_exact(op.to_dense(), ref[-14:, -14:])

@pytest.mark.parametrize('kw', [{'max_norm': 10.}, {'scale_grad_by_freq': True}], ids=['max_norm', 'scale_grad_by_freq'])
def test_embedding_offenders_refuse_fwd(kw):
    model = embedding_model(**kw)
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"module '0' \(Embedding with {name}=.*mode='rev'"):
        HessianOperator(model, CE, (IDX, TGT), mode='fwd')
    op = HessianOperator(model, CE, (IDX, TGT))  # auto: rev only
    assert_exact(op.to_dense(), HessianOperator(model, CE, (IDX, TGT), mode='rev').to_dense())
    assert not op._fwd_ok

class FunctionalPadding(nn.Module):
    "F.embedding with padding_idx inside a custom module: no nn.Embedding for the offenders list to see."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w, self.lin = nn.Parameter(torch.randn(6, 3)), nn.Linear(6, 2)
    def forward(self, x): return self.lin(F.embedding(x, self.w, padding_idx=0).flatten(1))

@pytest.mark.filterwarnings("default")
def test_guard_fwd_rev_disagreement():
    "The general guard: auto compares fwd and rev on its first product, uses rev on disagreement and warns once."
    model = FunctionalPadding().double()
    ref = reference(model, CE, (IDX,), (TGT,), fwd=False)
    op = HessianOperator(model, CE, (IDX, TGT))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        assert_exact(op.matvec(torch.ones(op.num_params, dtype=F64)), ref @ torch.ones(op.num_params, dtype=F64))
        V = torch.randn(op.num_params, 4, dtype=F64)
        assert_exact(op.matmat(V), ref @ V)
        assert_exact(op.to_dense(), ref)
    msgs = [str(x.message) for x in w if 'disagree' in str(x.message)]
    assert len(msgs) == 1 and 'relative difference' in msgs[0] and "mode='rev'" in msgs[0], msgs
    # to_dense alone (auto) checks before trusting fwd for its blocks
    with pytest.warns(UserWarning, match='disagree'):
        assert_exact(HessianOperator(model, CE, (IDX, TGT)).to_dense(), ref)

def test_guard_passes_and_keeps_fwd_where_exact():
    "Where fwd is exact the guard agrees: to_dense in auto still uses forward-over-reverse (no warning: see pytestmark)."
    model = embedding_model()
    op = HessianOperator(model, CE, (IDX, TGT))
    H = op.to_dense()
    assert op._fwd_ok and op._fwd_checked
    assert_exact(H, reference(model, CE, (IDX,), (TGT,)))


# ---------------------------------------------------------------- auto surfaces the user's own errors
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()

@pytest.mark.parametrize('K', [1, 3])
def test_auto_surfaces_user_errors(K):
    """A loss that raises once, on any of the calls of auto's first product (both modes timed), surfaces that exception
    unchanged instead of being retried in the other mode; the model is restored and the next product works."""
    model, x, y = _mlp(), torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    V = torch.randn(43, K, dtype=F64)
    calls, fail_at = [0], [None]
    class Boom(Exception): pass
    def loss(out, y):
        calls[0] += 1
        if calls[0] == fail_at[0]: raise (RuntimeError if calls[0] % 2 else Boom)(f"user error on call {calls[0]}")
        return CE(out, y)
    HessianOperator(model, loss, (x, y)).matmat(V)
    n = calls[0] - 1  # calls of one first product (after the construction's check)
    assert n >= 2
    ref = reference(model, CE, (x,), (y,))
    snap = snapshot(model)
    for k in range(1, n + 1):
        calls[0], fail_at[0] = 0, None
        op = HessianOperator(model, loss, (x, y))
        fail_at[0] = calls[0] + k
        exc = RuntimeError if fail_at[0] % 2 else Boom
        with pytest.raises(exc, match=f"user error on call {fail_at[0]}$"): op.matmat(V)
        assert_same_state(model, snap)
        assert_exact(op.matmat(V), ref @ V)  # the operator still works after the error

class NoForwardMode(torch.autograd.Function):
    "tanh with a backward but no forward-mode rule (old style: torch.func refuses it)."
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x); ctx.save_for_backward(y); return y
    @staticmethod
    def backward(ctx, g):
        y, = ctx.saved_tensors; return g * (1 - y * y)

@pytest.mark.filterwarnings("ignore:forward-over-reverse failed")
def test_auto_still_falls_back_when_a_mode_is_unavailable():
    class M(nn.Module):
        def __init__(self): super().__init__(); self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        def forward(self, x): return self.b(NoForwardMode.apply(self.a(x)))
    torch.manual_seed(0)
    model, x, y = M().double(), torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    Hrev = HessianOperator(model, CE, (x, y), mode='rev').to_dense()
    for mode in ('auto', 'fwd'):
        op = HessianOperator(model, CE, (x, y), mode=mode)
        assert_exact(op.matvec(torch.ones(43, dtype=F64)), Hrev @ torch.ones(43, dtype=F64))
        assert_exact(op.to_dense(), Hrev)
        assert not op._fwd_ok
