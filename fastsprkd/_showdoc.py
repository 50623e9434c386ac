"""`show_doc` renderer of the fastsprkd docs (hand-written, not generated; selected by `renderer` in pyproject's
`[tool.nbdev]`): a class shows as `class Name(...)`, a function as `def name(...)`, followed by fastai-style
parameter table (Type, Default, Details from the docments); defaults read as written (`2**30`, `None`, a function's
name), and parameters without an annotation show no type (not `NoneType`)."""

import inspect, re
from inspect import Parameter
from nbdev.showdoc import BasicMarkdownRenderer

__all__ = ['DocRenderer', 'fmt_default', 'link_external']

_empty = inspect.Parameter.empty


def fmt_default(o) -> str:
    "A default value as a reader would write it: `2**30` for large powers of two, names of functions and classes."
    if isinstance(o, bool) or o is None: return repr(o)
    if isinstance(o, int) and o >= 2**10 and o & (o - 1) == 0: return f'2**{o.bit_length() - 1}'
    if isinstance(o, float) and o and o == o and abs(o) < 1e-3: return f'{o:g}'
    if inspect.isclass(o) or inspect.isfunction(o) or inspect.isbuiltin(o): return o.__qualname__
    r = repr(o)
    return r if len(r) <= 40 else r[:37] + '...'


def _anno(a) -> str:
    if a is _empty: return ''
    if isinstance(a, str): return a
    s = inspect.formatannotation(a)
    return s.replace('typing.', '').replace('torch.nn.modules.module.Module', 'nn.Module').replace('torch.Tensor', 'Tensor')


def _esc(s: str) -> str:
    return str(s).replace('|', '\\|').replace('\n', ' ')


class DocRenderer(BasicMarkdownRenderer):
    "Markdown for `show_doc`: class or def signature, docstring, then a table of the parameters with their docments."
    def _params(self):
        "`(inspect.Parameter, docment)` of the documented callable, without `self`/`cls`."
        if self.sig is None: return []
        dm = getattr(self.dm, 'dm', {}) or {}
        ps = list(self.sig.parameters.values())
        if ps and ps[0].name in ('self', 'cls') and ps[0].kind in (Parameter.POSITIONAL_ONLY, Parameter.POSITIONAL_OR_KEYWORD):
            ps = ps[1:]
        return [(p, (dm.get(p.name) or {}).get('docment') or '') for p in ps]

    def _sig(self, params):
        parts, star = [], False
        for i, (p, _) in enumerate(params):
            if p.kind == Parameter.KEYWORD_ONLY and not star: parts.append('*'); star = True
            if p.kind == Parameter.VAR_POSITIONAL: star = True
            pre = '*' if p.kind == Parameter.VAR_POSITIONAL else '**' if p.kind == Parameter.VAR_KEYWORD else ''
            a = _anno(p.annotation)
            s = pre + p.name + (f':{a}' if a else '') + (f'={fmt_default(p.default)}' if p.default is not _empty else '')
            parts.append(s)
            if p.kind == Parameter.POSITIONAL_ONLY and (i + 1 == len(params) or params[i+1][0].kind != Parameter.POSITIONAL_ONLY):
                parts.append('/')
        ret = '' if inspect.isclass(self.sym) or self.sig is None else _anno(self.sig.return_annotation)
        kw = 'class' if inspect.isclass(self.sym) else 'async def' if inspect.iscoroutinefunction(self.sym) else 'def'
        head, tail = f'{kw} {self.nm}(', ')' + (f' -> {ret}' if ret else '')
        one = head + ', '.join(parts) + tail
        if len(one) <= 100: return one
        lines, cur = [], '    '
        for s in parts:
            if len(cur) + len(s) + 2 > 100 and cur.strip(): lines.append(cur.rstrip()); cur = '    '
            cur += s + ', '
        lines.append(cur.rstrip().rstrip(','))
        return head + '\n' + '\n'.join(lines) + '\n' + tail

    def _table(self, params):
        rows = [(p.name if p.kind not in (Parameter.VAR_POSITIONAL, Parameter.VAR_KEYWORD) else
                 ('*' if p.kind == Parameter.VAR_POSITIONAL else '**') + p.name,
                 _anno(p.annotation), '' if p.default is _empty else fmt_default(p.default), d) for p, d in params]
        ret = getattr(self.sig, 'return_annotation', _empty)
        rdoc = ((getattr(self.dm, 'dm', {}) or {}).get('return') or {}).get('docment') or ''
        if not inspect.isclass(self.sym) and ret not in (_empty, None, type(None)) and (rdoc or rows):
            rows.append(('**Returns**', _anno(ret), '', rdoc))
        if not rows or not any(r[3] for r in rows): return ''
        out = ['|    | **Type** | **Default** | **Details** |', '| -- | -------- | ----------- | ----------- |']
        out += [f'| {_esc(n)} | {_esc(a)} | {_esc(f"`{d}`" if d else "")} | {_esc(doc)} |' for n, a, d, doc in rows]
        return '\n'.join(out)

    def _repr_markdown_(self):
        doc = '---\n\n'
        from nbdev.doclinks import NbdevLookup
        src = NbdevLookup().code(self.fn)
        if src: doc += f'[source]({src}){{target="_blank" style="float:right; font-size:smaller"}}\n\n'
        doc += f'{"#" * self.title_level} {self.nm}\n\n'
        if self.sig is None or not callable(self.sym):
            return doc + (f'*{self.docs}*' if self.docs else '')
        params = self._params()
        doc += f'```python\n{self._sig(params)}\n```'
        if self.docs: doc += '\n\n' + re.sub(r'^(\s*)(.+)', r'\1*\2*', self.docs, count=1)
        tbl = self._table(params)
        if tbl: doc += '\n\n' + tbl
        return doc


# ---- links to the fastai and PyTorch docs (a `doc_procs` processor, run after nbdev's own `add_links`)
# nbdev links backticked names of the libraries in `strip_libs`; adding fastai there would also link our argument
# names (`params`, `requires_grad`) to unrelated fastai functions, so only the names below are linked.
_FASTAI = ['Learner', 'DataLoaders', 'DataLoader', 'MixedPrecision', 'Callback', 'TrackerCallback', 'Recorder',
           'TrainEvalCallback', 'ProgressCallback', 'CrossEntropyLossFlat', 'SGD', 'Adam', 'set_seed', 'accuracy',
           'Learner.fit', 'Learner.fine_tune', 'Learner.fit_one_cycle', 'Learner.export', 'Learner.validate',
           'Learner.freeze', 'Learner.unfreeze', 'Learner.to_fp16', 'Learner.no_bar', 'fine_tune', 'fit_one_cycle',
           'to_fp16', 'GradientAccumulation', 'DistributedTrainer', 'load_learner', 'Metric', 'BatchNorm']
_PT = 'https://pytorch.org/docs/stable/'
_TORCH = {'torch.func': 'func.html', 'torch.distributed': 'distributed.html', 'torch.compile': 'generated/torch.compile.html',
          'nn.Module': 'generated/torch.nn.Module.html', 'torch.nn.Module': 'generated/torch.nn.Module.html',
          'DistributedDataParallel': 'generated/torch.nn.parallel.DistributedDataParallel.html',
          'DataParallel': 'generated/torch.nn.DataParallel.html', 'nn.DataParallel': 'generated/torch.nn.DataParallel.html',
          'torch.autograd.grad': 'generated/torch.autograd.grad.html', 'torch.linalg.eigh': 'generated/torch.linalg.eigh.html',
          'torch.Generator': 'generated/torch.Generator.html', 'torch.utils.data.DataLoader': 'data.html#torch.utils.data.DataLoader',
          'torch.nn.utils.parameters_to_vector': 'generated/torch.nn.utils.parameters_to_vector.html'}
for _f in ['functional_call', 'hessian', 'jvp', 'vjp', 'vmap', 'grad', 'jacrev', 'jacfwd', 'linearize']:
    _TORCH[f'torch.func.{_f}'] = f'generated/torch.func.{_f}.html'


def _external_links():
    if not hasattr(_external_links, 'd'):
        d = {k: _PT + v for k, v in _TORCH.items()}
        try:
            from fastai._modidx import d as fd
            full = {k: v[0] for m in fd['syms'].values() for k, v in m.items()}
            for n in _FASTAI:
                hits = [u for k, u in full.items() if k.endswith('.' + n) and k.count('.') - n.count('.') >= 1]
                hits = sorted(hits, key=lambda u: ('callback.core' not in u, 'learner' not in u, len(u)))
                if hits: d[n] = hits[0] if hits[0].startswith('http') else 'https://docs.fast.ai/' + hits[0]
        except ImportError: pass
        _external_links.d = d
    return _external_links.d


_re_bare = re.compile(r'(?<!\[)`([A-Za-z_][\w.]*?)(\(\))?`(?!\]\()')


def _link_md(md: str) -> str:
    d, out, fence = _external_links(), [], False
    for l in md.splitlines(True):
        if l.lstrip().startswith('```'): fence = not fence
        elif not fence and not l.startswith('    '):
            l = _re_bare.sub(lambda m: f'[`{m.group(1)}{m.group(2) or ""}`]({d[m.group(1)]})' if m.group(1) in d else m.group(0), l)
        out.append(l)
    return ''.join(out)


def link_external(cell):
    "Link backticked fastai and PyTorch names (curated above) to docs.fast.ai and pytorch.org."
    if cell.cell_type == 'markdown': cell.source = _link_md(cell.source)
    for o in cell.get('outputs', []) or []:
        md = o.get('data', {}).get('text/markdown')
        if md: o['data']['text/markdown'] = _link_md(''.join(md) if isinstance(md, list) else md)
