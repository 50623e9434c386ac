"""A KeyboardInterrupt (Ctrl-C) at a random point of every entry point that touches a model leaves the model exactly as it was:
the same Parameter and buffer objects in the modules' slots, their values, `requires_grad`, `.grad` and train/eval modes."""
import contextlib, inspect, random, sys
import pytest, torch
from torch import nn
from fastsprkd import core
from fastsprkd.core import HessianOperator, preserved_state
from fastsprkd.eigen import eigsh
from fastsprkd.estimators import trace
from fastsprkd.analysis import loss_landscape, influence
from fastsprkd.callback import sprkd
from fastsprkd.callback.sprkd import negative_curvature_step


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double().train()
    m[0].weight.grad = torch.ones(4, 3, dtype=torch.float64)  # a pending gradient
    m[3].bias.requires_grad_(False)  # a frozen parameter
    return m


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))


def _snapshot(model):
    mods = list(model.named_modules())
    slots = [(n, kind, k, v) for n, m in mods for kind, d in (('p', m._parameters), ('b', m._buffers)) for k, v in d.items()]
    return dict(slots=slots, training=[m.training for _, m in mods],
                values=[None if v is None else v.detach().clone() for *_, v in slots],
                flags=[None if v is None else v.requires_grad for *_, v in slots],
                grads=[None if v is None or v.grad is None else v.grad.clone() for *_, v in slots])


def _assert_unchanged(model, s, allowed_values=None):
    now = _snapshot(model)
    assert [x[:3] for x in now['slots']] == [x[:3] for x in s['slots']], "slots added or removed"
    for a, b in zip(now['slots'], s['slots']):
        assert a[3] is b[3], f"{a[0]}.{a[2]} holds {type(a[3]).__name__} (requires_grad={getattr(a[3], 'requires_grad', None)}), not the original object"
    assert now['training'] == s['training']
    assert now['flags'] == s['flags']
    for (n, _, k, _), g, h in zip(s['slots'], now['grads'], s['grads']):
        assert (g is None) == (h is None) and (g is None or torch.equal(g, h)), f"grad of {n}.{k}"
    same = all(torch.equal(a, b) for a, b in zip(now['values'], s['values']))
    if not same and allowed_values is not None: same = all(torch.equal(a, b) for a, b in zip(now['values'], allowed_values))
    assert same, "values changed"


# code that restores state on a normal exit: a Ctrl-C landing *there* is outside what any Python code can guard
_cm = inspect.getsourcefile(contextlib)
_restore_codes = {preserved_state.__wrapped__.__code__}
_nc_src, _nc_first = inspect.getsourcelines(negative_curvature_step)
_nc_finally = _nc_first + next(i for i, l in enumerate(_nc_src) if l.strip().startswith('finally:'))


def _in_restore(frame):
    while frame is not None:
        c = frame.f_code
        if c in _restore_codes: return True
        if c.co_filename == _cm and c.co_name == '__exit__' and getattr(getattr(frame.f_locals.get('self'), 'gen', None), 'gi_code', None) in _restore_codes:
            return True  # exiting preserved_state (other context managers' exits, torch.func's included, may be interrupted)
        if c is negative_curvature_step.__code__ and frame.f_lineno >= _nc_finally: return True
        frame = frame.f_back
    return False


class _Interrupter:
    "A trace function that counts Python 'call'/'line' events and raises KeyboardInterrupt at event `at` (never in restore code)."
    def __init__(self, at=None): self.at, self.count, self.fired, self.swaps = at, 0, False, []
    def __call__(self, frame, event, arg):
        if event in ('call', 'line') and not self.fired:
            self.count += 1
            # events inside torch.func's swapping of tensors into the module slots: where the interrupts struck
            if self.at is None and frame.f_code.co_name in ('swap_tensors_dict', 'swap_tensor'): self.swaps.append(self.count)
            if self.at is not None and self.count >= self.at and not _in_restore(frame):
                self.fired = True
                raise KeyboardInterrupt(f"injected at event {self.count}")
        return self


def _traced(fn, tracer):
    old = sys.gettrace()
    sys.settrace(tracer)
    try: return fn()
    finally: sys.settrace(old)


_loss = nn.CrossEntropyLoss()
_ENTRY = {
    'loss_landscape': lambda m, d: loss_landscape(m, _loss, d, alphas=torch.linspace(-0.1, 0.1, 3)),
    'eigsh': lambda m, d: eigsh(HessianOperator(m, _loss, d, mode='rev'), 1, max_matvecs=12, warn=False),
    'trace': lambda m, d: trace(HessianOperator(m, _loss, d, mode='rev'), num_matvecs=6),
    'to_dense': lambda m, d: HessianOperator(m, _loss, d, mode='rev').to_dense(),
    'influence': lambda m, d: influence(m, _loss, d, (d[0][:2], d[1][:2]), damping=0.01, method='cg', max_iter=5),
    'negative_curvature_step': lambda m, d: negative_curvature_step(m, _loss, d, max_matvecs=12, tol=1e-2),
}


@pytest.mark.parametrize('name', list(_ENTRY))
def test_keyboard_interrupt_at_random_points_leaves_the_model_unchanged(name):
    fn, data = _ENTRY[name], _data()
    fn(_model(), data)  # warm-up: one-time work (lazy imports, scripted functions) would make the first traced run longer
    model = _model()
    counter = _Interrupter()
    _traced(lambda: fn(model, data), counter)  # a full run: how many events there are (and what a kept step gives)
    allowed = None
    if name == 'negative_curvature_step': allowed = _snapshot(model)['values']  # a step taken before the interrupt is kept
    rng = random.Random(f"{name}-19")
    n = counter.count
    points = rng.sample(range(1, n + 1), min(n, 6))  # anywhere
    points = sorted(set(points + rng.sample(counter.swaps, min(len(counter.swaps), 6))))  # and while torch.func swaps tensors
    fired = 0
    for at in points:
        model = _model()
        before = _snapshot(model)
        t = _Interrupter(at)
        try: _traced(lambda: fn(model, data), t)
        except KeyboardInterrupt: fired += 1
        except RuntimeError as e:  # an interrupt inside code that TorchScript runs (torch._decomp) reaches us wrapped
            if 'KeyboardInterrupt: injected' not in str(e): raise
            fired += 1
        _assert_unchanged(model, before, allowed)
        assert torch._C._functorch.peek_interpreter_stack() is None, "a torch.func transform layer was left behind"
    assert fired >= len(points) // 2, (fired, points, n)
