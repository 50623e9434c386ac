"""Design rules of the package, checked on the source with `ast` (no import): no fastsprkd module imports a private
(leading-underscore) name from another fastsprkd module, and the modules form layers where a module imports only
modules of lower layers."""
import ast
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parent.parent/'fastsprkd'

# The layers, lowest first: a module may import fastsprkd modules of strictly lower layers only. The curvature engine
# (`fastsprkd.curvature`) is functional < base < hessian < ggn/fisher, re-exported by `core`; `data` imports only
# `curvature.functional` (the RNG guard, plain tensors, validation transforms: plain torch, none of the engine), and
# `callback.sprkd` stores saddles with `saddle`.
LAYERS = [
    {'fastsprkd.curvature.functional', 'fastsprkd.models'},
    {'fastsprkd.curvature.base', 'fastsprkd.data'},
    {'fastsprkd.curvature.hessian'},
    {'fastsprkd.curvature.ggn', 'fastsprkd.curvature.fisher'},
    {'fastsprkd.core'},
    {'fastsprkd.eigen', 'fastsprkd.saddle', 'fastsprkd.kfac'},
    {'fastsprkd.estimators'},
    {'fastsprkd.stability', 'fastsprkd.analysis'},
    {'fastsprkd.callback.core'},
    {'fastsprkd.callback.observe', 'fastsprkd.callback.sprkd', 'fastsprkd.interpret'},
    {'fastsprkd.experiment.story', 'fastsprkd.experiment.outdir'},
    {'fastsprkd.experiment.stats', 'fastsprkd.experiment.report'},
    {'fastsprkd.experiment'},
    {'fastsprkd.cli'},
    {'fastsprkd.all', 'fastsprkd.__main__'},
]
# modules outside the layers: the package's own plumbing (nbdev's index, the docs renderer, empty package inits)
UNLAYERED = {'fastsprkd', 'fastsprkd._modidx', 'fastsprkd._showdoc', 'fastsprkd.callback', 'fastsprkd.curvature'}
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}

def _modules(pkg=PKG):
    "(module name, is a package `__init__`, path) of every module of the package."
    for p in sorted(pkg.rglob('*.py')):
        parts = p.relative_to(pkg.parent).with_suffix('').parts
        init = parts[-1] == '__init__'
        yield '.'.join(parts[:-1] if init else parts), init, p

def _imports(name, init, path):
    "(line, imported module, names imported from it or None for `import m`) of every fastsprkd import in the module."
    pkg = name.split('.') if init else name.split('.')[:-1]
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg[:len(pkg) - (n.level - 1)]
                target = '.'.join(base + ([n.module] if n.module else []))
            else: target = n.module or ''
            if target == 'fastsprkd' or target.startswith('fastsprkd.'): yield n.lineno, target, [a.name for a in n.names]
        elif isinstance(n, ast.Import):
            for a in n.names:
                if a.name == 'fastsprkd' or a.name.startswith('fastsprkd.'): yield n.lineno, a.name, None

def _is_module(target, nm, root=PKG.parent):
    "Whether `from target import nm` imports a submodule (a module name, not a name defined in a module)."
    d = root.joinpath(*target.split('.'))
    return (d/f'{nm}.py').exists() or (d/nm/'__init__.py').exists()

MODULES = list(_modules())

def test_modules_found():
    names = {m for m, _, _ in MODULES}
    assert {'fastsprkd.core', 'fastsprkd.curvature.base', 'fastsprkd.analysis', 'fastsprkd.callback.core', 'fastsprkd.experiment.report'} <= names
    # every module is placed: a new module must be given a layer here
    assert names - UNLAYERED - set(RANK) == set(), "modules without a layer in tests/test_design.py LAYERS"

def _private_violations(modules, root=PKG.parent):
    bad = []
    for name, init, path in modules:
        for line, target, names in _imports(name, init, path):
            if target == name or names is None: continue
            bad += [f"{path.relative_to(root)}:{line} imports {nm} from {target}" for nm in names
                    if nm.startswith('_') and not _is_module(target, nm, root)]
    return bad

def _layer_violations(modules, root=PKG.parent):
    bad = []
    for name, init, path in modules:
        if name in UNLAYERED: continue
        for line, target, names in _imports(name, init, path):
            # `from . import story` inside a package imports its submodules
            targets = [f'{target}.{nm}' for nm in names if _is_module(target, nm, root)] if names else []
            for t in targets or [target]:
                if t not in RANK: bad.append(f"{name}:{line} imports {t}, which is not a library layer"); continue
                if RANK[t] >= RANK[name]: bad.append(f"{name} (layer {RANK[name]}):{line} imports {t} (layer {RANK[t]})")
    return bad

def test_no_private_names_across_modules():
    bad = _private_violations(MODULES)
    assert not bad, "private names imported from another module (make them public where they belong):\n" + '\n'.join(bad)

def test_layers():
    bad = _layer_violations(MODULES)
    assert not bad, "imports that break the layer order (a module imports only lower layers):\n" + '\n'.join(bad)

def test_checks_can_fail(tmp_path):
    "On a small fake package, both checks report a private import across modules and an upward import; not a clean one."
    src = tmp_path/'fastsprkd'; (src/'callback').mkdir(parents=True)
    (src/'__init__.py').write_text('')
    (src/'eigen.py').write_text("def _helper(): pass\n")
    (src/'core.py').write_text("from .analysis import loss_landscape\nfrom .eigen import _helper\n")
    (src/'analysis.py').write_text("from .core import as_operator\nfrom . import eigen as _eigen\n")
    (src/'callback'/'core.py').write_text("from ..core import _plain\nfrom ..analysis import loss_landscape\n")
    mods = list(_modules(src))
    assert sorted(_private_violations(mods, tmp_path)) == [
        'fastsprkd/callback/core.py:1 imports _plain from fastsprkd.core', 'fastsprkd/core.py:2 imports _helper from fastsprkd.eigen']
    assert _layer_violations(mods, tmp_path) == [
        f"fastsprkd.core (layer {RANK['fastsprkd.core']}):1 imports fastsprkd.analysis (layer {RANK['fastsprkd.analysis']})",
        f"fastsprkd.core (layer {RANK['fastsprkd.core']}):2 imports fastsprkd.eigen (layer {RANK['fastsprkd.eigen']})"]

def test_star_import_shadows_no_fastai_name():
    """`from fastai.vision.all import *` then `from fastsprkd.all import *` replaces no fastai name, except `trace` (the
    Hutchinson estimator of `fastsprkd.estimators` over fastcore's debugging decorator `fastcore.xtras.trace`)."""
    fa, fs = {}, {}
    exec('from fastai.vision.all import *', fa)
    exec('from fastsprkd.all import *', fs)
    shadowed = {n for n in fs if not n.startswith('__') and n in fa and fs[n] is not fa[n]}
    assert shadowed <= {'trace'}, f"fastsprkd.all replaces fastai names: {sorted(shadowed - {'trace'})}; give them descriptive names"
