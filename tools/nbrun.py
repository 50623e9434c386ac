#!/usr/bin/env python
"""Execute the notebooks in place, so that the docs show their outputs: `python tools/nbrun.py [nbs | a.ipynb ...]`.

Every cell runs (`#| slow` ones too; `#| eval: false` ones do not), in a fresh execnb shell per notebook, with fixed
seeds, progress bars off (a fastai fit shows its final metrics table only), PNG figures at a low dpi, and text
outputs capped, so that the stored notebooks stay small. A cell that raises stops the run with an error. Run
`nbdev-clean` afterwards (`make docs-run` does both).
"""
from __future__ import annotations
import argparse, json, os, re, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DPI = 72
MAX_LINES, MAX_CHARS, MAX_HTML, MAX_IMG = 40, 6000, 60_000, 400_000

PREAMBLE = f'''
import os, random, warnings
warnings.filterwarnings('ignore', message=r'`torch\\.jit\\.script` is deprecated', category=FutureWarning)
import numpy as np, torch
random.seed(0); np.random.seed(0); torch.manual_seed(0)
import matplotlib
matplotlib.rcParams.update({{'figure.dpi': {DPI}, 'savefig.dpi': {DPI}}})
from matplotlib_inline.backend_inline import set_matplotlib_formats
set_matplotlib_formats('png', dpi={DPI})
import fastprogress.fastprogress as _fp
from IPython.display import display as _display, HTML as _HTML

class _QuietBar(_fp.ProgressBar):
    "A progress bar that shows nothing."

class _QuietMaster(_fp.MasterBar):
    "A master bar that shows nothing while it runs, then the table of metrics once."
    def __init__(self, gen, total=None, hdrs=None, **kwargs):
        super().__init__(gen, _QuietBar, total)
        self.lines, self._shown = ([hdrs] if hdrs else []), False
    def write(self, line, table=False):
        if table: self.lines.append(line)
    def on_iter_end(self):
        if self.lines and not self._shown: self._shown = True; _display(_HTML(_fp.text2html_table(self.lines)._repr_html_()))

_fp.master_bar, _fp.progress_bar = _QuietMaster, _QuietBar
_fp.NBMasterBar, _fp.NBProgressBar = _QuietMaster, _QuietBar
import fastai.callback.progress as _fcp
_fcp.master_bar, _fcp.progress_bar = _QuietMaster, _QuietBar
del _fcp
'''


def _text(v): return ''.join(v) if isinstance(v, list) else v


def _cap(t: str) -> str:
    lines = t.splitlines(True)
    if len(lines) > MAX_LINES: t = ''.join(lines[:MAX_LINES]) + f'… ({len(lines) - MAX_LINES} more lines not stored)\n'
    if len(t) > MAX_CHARS: t = t[:MAX_CHARS] + f'… ({len(t) - MAX_CHARS} more characters not stored)\n'
    return t


def shrink(nb) -> list[str]:
    "Cap the outputs of `nb` in place (text, HTML, images); returns warnings about what was cut."
    warns = []
    for i, c in enumerate(nb['cells']):
        outs = []
        for o in c.get('outputs', []) or []:
            if o.get('output_type') == 'stream':
                t = re.sub(r'[^\n]*\r(?!\n)', '', _text(o['text']))
                t = re.sub(r'<ipython-input-\d+-[0-9a-f]+>:\d+: ', '', t)           # warnings raised in the notebook
                t = re.sub(r'/\S*/site-packages/', '', t)                           # this machine's paths
                o['text'] = _cap(t)
                if not o['text'].strip(): continue
            d = o.get('data', {})
            if 'text/html' in d:
                h = _text(d['text/html'])
                if '<progress' in h or (h.lstrip().startswith('<style') and 'progress' in h): continue
                if len(h) > MAX_HTML: d.pop('text/html'); warns.append(f'cell {i}: HTML output of {len(h)} chars dropped')
            if 'text/plain' in d: d['text/plain'] = _cap(_text(d['text/plain']))
            for k in [k for k in d if k.startswith('image/')]:
                if len(_text(d[k])) > MAX_IMG: warns.append(f'cell {i}: {k} of {len(_text(d[k]))} base64 chars')
            if o.get('output_type') in ('display_data', 'execute_result') and not d: continue
            outs.append(o)
        if 'outputs' in c: c['outputs'] = outs
    return warns


def run_one(path: Path) -> None:
    "Execute notebook `path` in place (called in a fresh process)."
    from execnb.shell import CaptureShell
    from fastcore.nbio import read_nb
    os.chdir(path.parent)
    sh = CaptureShell(path, mpl_format='png')
    sh.run(PREAMBLE)
    if sh.exc: raise sh.exc
    nb = read_nb(path)
    skip = lambda c: c.cell_type == 'code' and re.search(r'(?m)^#\s*\|\s*eval:\s*false', c.source or '')
    sh.run_all(nb, exc_stop=True, preproc=skip)
    d = json.loads(json.dumps(nb))  # plain dicts
    for w in shrink(d): print(f'{path.name}: {w}', file=sys.stderr)
    path.write_text(json.dumps(d, sort_keys=True, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('paths', nargs='*', default=['nbs'])
    ap.add_argument('--one', help=argparse.SUPPRESS)
    ap.add_argument('--n-workers', type=int, default=int(os.environ.get('NB_WORKERS', 1)))
    a = ap.parse_args(argv)
    if a.one: run_one(Path(a.one).resolve()); return 0
    files = []
    for p in map(Path, a.paths):
        files += sorted(f for f in p.glob('*.ipynb') if not f.name.startswith(('_', '.'))) if p.is_dir() else [p]
    env = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), 'MPLBACKEND': 'Agg',
           'PYTHONHASHSEED': '0', 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
    def go(f):
        t = time.time()
        r = subprocess.run([sys.executable, __file__, '--one', str(f)], env=env, capture_output=True, text=True)
        return f, r, time.time() - t
    failed = []
    with ThreadPoolExecutor(max(1, a.n_workers)) as ex:
        for f, r, dt in ex.map(go, files):
            size = f.stat().st_size / 1e3
            print(f'{f}: {"ok" if r.returncode == 0 else "FAILED"} in {dt:.0f} s, {size:.0f} kB', flush=True)
            if r.stderr.strip() and r.returncode: sys.stderr.write(r.stderr[-3000:])
            elif r.stderr.strip(): sys.stderr.write(''.join(l for l in r.stderr.splitlines(True) if l.startswith(f.name)))
            if r.returncode: failed.append(f)
    if failed: print(f'{len(failed)} notebook(s) failed: {", ".join(map(str, failed))}', file=sys.stderr); return 1
    return 0


if __name__ == '__main__': sys.exit(main())
