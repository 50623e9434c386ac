#!/usr/bin/env python
"""Check (and partly fix) the documentation notebooks in `nbs/`.

    python tools/nbcheck.py --check            # report problems, exit 1 if any
    python tools/nbcheck.py --fix              # fix what can be fixed mechanically (idempotent), then check
    python tools/nbcheck.py --check --proc     # also run nbdev's docs processing (into _proc/) and check its links

Checks:
- `mixed-imports`: a code cell holds imports and other code. nbdev's docs processing runs import cells out of
  context (its FAQ: imports in their own cell), so `import pandas as pd; pd.DataFrame(learn...)` crashes it.
  `--fix` splits such cells into runs of consecutive import statements and of other statements, in order, each
  part keeping the cell's directives (`#| export` stays on both parts), so exported modules keep their code order.
- `visible-test`: a code cell made only of checks (`test_*` calls, `assert`) right after a code cell, that is, in
  the middle of the API reference, is not `#| hide`. `--fix` adds `#| hide`. (A check cell that follows prose is
  an example the prose introduces, and stays visible.)
- `no-plot-output`: a code cell that plots (`.plot(`, `plt.`, `show_batch`, ...) has no stored image output
  (run `make docs-run`).
- `index-stale`: `nbs/index.ipynb`, the site's home page, does not hold what README.md says (README.md is
  hand-written; nbdev must not regenerate it). `--fix` rebuilds the page from README.md, links rewritten for the site.
- `external-ref`: a notebook cites a file the reader does not have (SPEC, STYLE, /work/...).
- `dead-link` (with `--proc`, or `--links DIR`): a link in the processed notebooks points to a page of the site, or
  a file of the repository, that does not exist.
"""
from __future__ import annotations
import argparse, ast, hashlib, json, re, subprocess, sys, os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- notebooks

def read_nb(p):
    return json.loads(Path(p).read_text(encoding='utf-8'))

def write_nb(nb, p):
    "Write like nbdev does (indent=1, keys sorted, utf-8, trailing newline)."
    Path(p).write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')

def src(cell) -> str:
    s = cell.get('source', '')
    return ''.join(s) if isinstance(s, list) else s

def set_src(cell, text):
    cell['source'] = text.splitlines(True)

_dir_re = re.compile(r'^\s*#\s*\|')

def split_directives(text):
    "(directive lines, remaining lines) of a cell's source; directives are the leading `#|` lines."
    lines = text.splitlines(True)
    i = 0
    while i < len(lines) and (_dir_re.match(lines[i]) or (not lines[i].strip() and i + 1 < len(lines) and _dir_re.match(lines[i+1]))):
        i += 1
    return lines[:i], lines[i:]

def directives(text):
    d = {}
    for l in split_directives(text)[0]:
        l = _dir_re.sub('', l).strip()
        if not l: continue
        k, _, v = l.partition(':') if ':' in l.split()[0] else (l.split()[0], '', ' '.join(l.split()[1:]))
        d[k.strip()] = v.strip()
    return d

def parse(body_lines):
    "AST of the code lines, IPython magics/shell lines replaced by `pass` (line numbers kept); None if unparsable."
    code = ''.join(re.sub(r'^(\s*)[%!].*', r'\1pass', l.rstrip('\n')) + '\n' for l in body_lines)
    try: return ast.parse(code)
    except SyntaxError: return None

def _is_import(node) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)): return True
    if isinstance(node, ast.Try):  # try: import x / except ImportError: x = None
        body_ok = node.body and all(isinstance(n, (ast.Import, ast.ImportFrom, ast.Pass)) for n in node.body)
        hand_ok = all(isinstance(n, (ast.Import, ast.ImportFrom, ast.Pass, ast.Assign)) for h in node.handlers for n in h.body)
        return bool(body_ok and hand_ok and not node.orelse and not node.finalbody)
    return False

def _start(node):
    "First line of a statement, decorators included."
    return min([node.lineno] + [d.lineno for d in getattr(node, 'decorator_list', [])])

def import_runs(body_lines):
    """Runs of consecutive import / other statements: list of (is_import, first_line_idx) or None if unparsable.
    Comments and blank lines before a statement belong to its run."""
    tree = parse(body_lines)
    if tree is None or not tree.body: return None
    runs, prev_end = [], 0
    for node in tree.body:
        k = _is_import(node)
        if not runs or runs[-1][0] != k: runs.append((k, prev_end))
        prev_end = node.end_lineno
    return runs

def is_mixed(cell) -> bool:
    if cell['cell_type'] != 'code': return False
    runs = import_runs(split_directives(src(cell))[1])
    return bool(runs) and len(runs) > 1

def _new_id(old, i):
    return hashlib.sha1(f'{old}-{i}'.encode()).hexdigest()[:8]

def split_cell(cell):
    "The parts of a mixed cell (the first keeps the cell's id and metadata)."
    dirs, body = split_directives(src(cell))
    runs = import_runs(body)
    bounds = [r[1] for r in runs] + [len(body)]
    parts = []
    for i in range(len(runs)):
        lines = body[bounds[i]:bounds[i+1]]
        while lines and not lines[-1].strip(): lines.pop()
        while lines and not lines[0].strip(): lines.pop(0)
        if lines and not lines[-1].endswith('\n'): pass
        text = ''.join(dirs + lines).rstrip('\n')
        c = dict(cell)
        c['metadata'] = dict(cell.get('metadata', {}))
        if i: c['id'] = _new_id(cell.get('id', ''), i)
        c['outputs'] = cell.get('outputs', []) if i == len(runs) - 1 else []
        c['execution_count'] = None
        set_src(c, text)
        parts.append(c)
    return parts

_test_call = re.compile(r'^(test_\w*|assert_\w*)$')

def _is_check(node) -> bool:
    if isinstance(node, ast.Assert): return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        f = node.value.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ''
        return bool(_test_call.match(name))
    return False

def is_visible_test(cells, i) -> bool:
    c = cells[i]
    if c['cell_type'] != 'code' or i == 0 or cells[i-1]['cell_type'] != 'code': return False
    d = directives(src(c))
    if d.keys() & {'hide', 'export', 'exports', 'exporti', 'include', 'echo'} or d.get('include') == 'false': return False
    tree = parse(split_directives(src(c))[1])
    return bool(tree and tree.body and all(_is_check(n) for n in tree.body))

def hide_cell(cell):
    dirs, body = split_directives(src(cell))
    set_src(cell, ''.join(['#| hide\n'] + dirs + body))

_plot_attrs = {'plot', 'show_batch', 'show_results', 'imshow', 'plot_loss', 'plot_lr_find', 'plot_sched', 'hist',
               'scatter', 'matshow', 'show_image', 'show_images', 'savefig'}

def plots(cell) -> bool:
    "Whether the cell's own top-level code (not a function/class it defines) draws a figure."
    if cell['cell_type'] != 'code': return False
    text = src(cell)
    d = directives(text)
    if d.keys() & {'export', 'exporti', 'exports'} or d.get('eval', '').lower() == 'false': return False
    tree = parse(split_directives(text)[1])
    if tree is None: return False
    stack = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)): continue
        if isinstance(n, ast.Attribute) and (n.attr in _plot_attrs or n.attr.startswith('plot_')): return True
        if isinstance(n, ast.Name) and n.id == 'plt': return True
        stack.extend(ast.iter_child_nodes(n))
    return False

def has_image(cell) -> bool:
    return any(k.startswith('image/') for o in cell.get('outputs', []) for k in o.get('data', {}))

_ext_ref = re.compile(r'\bSPEC(\.md)?\s*§|\bSPEC\.md\b|\bSTYLE\.md\b|/work/(shared|notes|main|wt)\b')

# ---------------------------------------------------------------- checks

def nb_files(nbs):
    return sorted(p for p in Path(nbs).glob('*.ipynb') if not p.name.startswith(('.', '_')))

def check_nb(p, fix=False):
    "Problems of notebook `p` as (path, cell index, kind, message); with `fix`, fix what can be fixed first."
    nb = read_nb(p)
    if fix:
        cells, changed = [], False
        for c in nb['cells']:
            if is_mixed(c): cells.extend(split_cell(c)); changed = True
            else: cells.append(c)
        for i in range(len(cells)):
            if is_visible_test(cells, i): hide_cell(cells[i]); changed = True
        if changed: nb['cells'] = cells; write_nb(nb, p)
    probs = []
    cells = nb['cells']
    for i, c in enumerate(cells):
        body = [l for l in split_directives(src(c))[1] if l.strip()]
        where = body[0].strip()[:70] if body else ''
        if is_mixed(c): probs.append((p, i, 'mixed-imports', f'imports and other code in one cell: {where!r}'))
        if is_visible_test(cells, i): probs.append((p, i, 'visible-test', f'check cell inside the API reference is not `#| hide`: {where!r}'))
        if plots(c) and not has_image(c): probs.append((p, i, 'no-plot-output', f'plots but has no stored image (run `make docs-run`): {where!r}'))
        m = _ext_ref.search(src(c))
        if m: probs.append((p, i, 'external-ref', f'cites a file the reader does not have ({m.group(0)!r})'))
    return probs

# ---------------------------------------------------------------- links of the processed notebooks

_md_link = re.compile(r'\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_href = re.compile(r'''(?:href|src)\s*=\s*["']([^"']+)["']''')

def _nb_text(nb):
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] == 'markdown': yield i, src(c)
        for o in c.get('outputs', []):
            for k, v in o.get('data', {}).items():
                if k in ('text/markdown', 'text/html'): yield i, ''.join(v) if isinstance(v, list) else v

def site_pages(nbs):
    "html page names of the site built from `nbs` (nbdev strips numeric prefixes)."
    from nbdev.config import nbpath2html
    nbs = Path(nbs)
    pages = set()
    for f in nbs.rglob('*'):
        rel = f.relative_to(nbs)
        if any(p.startswith(('.', '_')) for p in rel.parts): continue
        if f.suffix in ('.ipynb', '.qmd', '.md'): pages.add(nbpath2html(rel).as_posix())
        elif f.is_file(): pages.add(rel.as_posix())
    return pages

def check_links(proc, nbs=None, root=ROOT):
    "Dead links in the processed notebooks under `proc`: site pages (absolute or relative) and repository files."
    from nbdev.config import get_config
    cfg = get_config(root)
    nbs = Path(nbs or cfg.nbs_path)
    pages = site_pages(nbs)
    site = (cfg.doc_host.rstrip('/') + cfg.doc_baseurl.rstrip('/') + '/') if cfg.doc_host else None
    repo = cfg.git_url.rstrip('/') + '/' if cfg.git_url else None
    probs = []
    for p in sorted(Path(proc).rglob('*.ipynb')):
        if any(part.startswith('.') for part in p.relative_to(proc).parts): continue
        nb = read_nb(p)
        for i, text in _nb_text(nb):
            for url in set(_md_link.findall(text) + _href.findall(text)):
                target = url.split('#')[0].split('?')[0]
                if site and url.startswith(site):
                    page = target[len(site):] or 'index.html'
                    if page.endswith('.html.md'): page = page[:-3]
                    if page not in pages: probs.append((p, i, 'dead-link', f'{url}: no page {page!r} in {nbs.name}/'))
                elif repo and url.startswith(repo):
                    m = re.match(r'(?:tree|blob|raw)/[^/]+/(.*)', target[len(repo):])
                    if m and not (root/m.group(1)).exists():
                        probs.append((p, i, 'dead-link', f'{url}: no file {m.group(1)!r} in the repository'))
                elif not re.match(r'^[a-zA-Z][\w+.-]*:|^#|^//', url) and target:
                    rel = (p.parent.relative_to(proc) / target).as_posix()
                    rel = os.path.normpath(rel)
                    if rel.endswith('.html.md'): rel = rel[:-3]
                    if rel not in pages and not (nbs/rel).exists():
                        probs.append((p, i, 'dead-link', f'{url}: no page or file {rel!r} in {nbs.name}/'))
    return probs

def proc_docs(root=ROOT, n_workers=2):
    """nbdev's docs processing (what `nbdev-proc-nbs` does before Quarto renders), without its attempt to install
    Quarto. Runs in a subprocess from `root`, so an exception in it (a notebook that crashes) fails the check."""
    code = ("import os, nbdev.doclinks\n"
            "from nbdev.config import get_config\n"
            "from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar\n"
            "from nbdev.serve import proc_nbs\n"
            "cfg = get_config(); os.chdir(cfg.config_path)\n"
            "refresh_quarto_yml(); nbdev.doclinks._build_modidx(); nbdev_sidebar.__wrapped__(path=cfg.nbs_path)\n"
            f"proc_nbs(cfg.nbs_path, n_workers={n_workers})\n")
    env = {**os.environ, 'PYTHONPATH': str(root) + os.pathsep + os.environ.get('PYTHONPATH', ''), 'MPLBACKEND': 'Agg'}
    r = subprocess.run([sys.executable, '-c', code], cwd=root, env=env, capture_output=True, text=True)
    if r.returncode:
        err = r.stderr.strip().splitlines()
        i = next((k for k, l in enumerate(err) if l.startswith('Exception: Error in notebook')), max(0, len(err) - 15))
        sys.stderr.write('nbdev docs processing failed:\n' + '\n'.join(err[i:]) + '\n')
        return False
    return True

# ---------------------------------------------------------------- home page from the README

def index_nb(root=ROOT):
    "The site's home page (`nbs/index.ipynb`) holding README.md, its links rewritten to the site or the repository."
    from nbdev.config import get_config, nbpath2html
    cfg = get_config(root)
    nbs, git = Path(cfg.nbs_path), cfg.git_url.rstrip('/')
    text = (root/'README.md').read_text(encoding='utf-8')
    def url(t):
        if re.match(r'^[a-zA-Z][\w+.-]*:|^#', t): return t
        path, _, frag = t.partition('#')
        f = (root/path)
        if f.suffix == '.ipynb' and f.parent.resolve() == nbs.resolve(): return nbpath2html(f.name).as_posix() + (f'#{frag}' if frag else '')
        kind = 'tree' if f.is_dir() else 'raw' if f.suffix.lower() in ('.png', '.jpg', '.jpeg', '.gif', '.svg') else 'blob'
        return f'{git}/{kind}/{cfg.branch}/{path.rstrip("/")}' + (f'#{frag}' if frag else '')
    text = re.sub(r'(\]\()([^)\s]+)(\))', lambda m: m.group(1) + url(m.group(2)) + m.group(3), text)
    def nblink(m):
        f = nbs/Path(m.group(2)).name
        return f'[`{m.group(1) or ""}{m.group(2)}`]({nbpath2html(f.name).as_posix()})' if f.exists() else m.group(0)
    text = re.sub(r'(?<!\[)`(nbs/)?(\d\w*\.ipynb)`', nblink, text)
    lines = text.splitlines()
    assert lines[0].startswith('# '), 'README.md must start with its title'
    paras = '\n'.join(lines[1:]).strip().split('\n\n')
    summary = ' '.join(paras[0].split())
    body = '\n\n'.join(paras[1:])
    secs = re.split(r'(?m)^(?=## )', body)
    note = '<!-- Generated from README.md by `python tools/nbcheck.py --fix`: edit README.md, not this notebook. -->\n\n'
    srcs = [f'{lines[0]}\n\n> {summary}'] + [(note if i == 0 else '') + s.strip() for i, s in enumerate(secs) if s.strip()]
    cells = [dict(cell_type='markdown', id=hashlib.sha1(f'index-{i}'.encode()).hexdigest()[:8], metadata={},
                  source=s.splitlines(True)) for i, s in enumerate(srcs)]
    return dict(cells=cells, metadata={'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
                nbformat=4, nbformat_minor=5)

def check_index(root=ROOT, fix=False):
    p = Path(root)/'nbs'/'index.ipynb'
    want = json.dumps(index_nb(root), sort_keys=True, indent=1, ensure_ascii=False) + '\n'
    if p.exists() and p.read_text(encoding='utf-8') == want: return []
    if fix: p.write_text(want, encoding='utf-8'); return []
    return [(p, 0, 'index-stale', 'the home page does not hold what README.md says (python tools/nbcheck.py --fix)')]

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--check', action='store_true', help='report problems; exit 1 if any (the default)')
    ap.add_argument('--fix', action='store_true', help='split mixed import cells, hide check cells, then check')
    ap.add_argument('--proc', action='store_true', help="run nbdev's docs processing into _proc/ and check its links")
    ap.add_argument('--links', metavar='DIR', help='check the links of the processed notebooks in DIR')
    ap.add_argument('--nbs', default=None, help='notebook folder (default: nbdev nbs_path)')
    ap.add_argument('--skip', default='', help='comma-separated kinds to skip, e.g. no-plot-output')
    ap.add_argument('--n-workers', type=int, default=2)
    a = ap.parse_args(argv)
    nbs = Path(a.nbs) if a.nbs else ROOT/'nbs'
    probs = []
    for p in nb_files(nbs): probs += check_nb(p, fix=a.fix)
    if not a.nbs: probs += check_index(ROOT, fix=a.fix)
    links = a.links
    if a.proc:
        if not proc_docs(ROOT, a.n_workers): return 1
        links = ROOT/'_proc'
    if links: probs += check_links(links, nbs)
    skip = set(filter(None, a.skip.split(',')))
    probs = [o for o in probs if o[2] not in skip]
    for p, i, kind, msg in probs:
        try: p = Path(p).resolve().relative_to(ROOT)
        except ValueError: pass
        print(f'{p} cell {i}: [{kind}] {msg}')
    if probs:
        print(f'{len(probs)} documentation problem(s). Mechanical ones: `python tools/nbcheck.py --fix`; '
              'missing outputs: `make docs-run`.', file=sys.stderr)
        return 1
    print(f'docs check: {len(nb_files(nbs))} notebooks OK' + (' (links checked)' if links else ''))
    return 0

if __name__ == '__main__': sys.exit(main())
