#!/usr/bin/env python
"""Screenshots of the processed docs (nbdev's output before Quarto, in `_proc/`): `python tools/screenshots.py`.

Each page is converted to HTML with pandoc (markdown cells, show_doc tables, code cells without `echo: false`, their
outputs with the plots) and photographed from a chosen section on with headless Chromium; PNGs (palette-reduced,
a few hundred kB) go to `docs/`. Needs `pandoc` and `chromium` (Debian: `apt-get install -y pandoc chromium`) and
a `_proc/` from `python tools/nbcheck.py --proc` (`make docs-screenshots` does both).
"""
from __future__ import annotations
import base64, json, os, re, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (processed notebook, text of the first cell to show, output name, window height)
SHOTS = [('02c_curvature_hessian.ipynb', 'show_doc(HessianOperator)', 'docs_core_hessianoperator', 2200),
         ('10_observe.ipynb', '## Example: the digits CNN at the edge of stability', 'docs_observe_example', 2300),
         ('95_tutorial.ipynb', '## 1. The teacher captures saddle points', 'docs_tutorial', 2400)]
WIDTH = 1100

CSS = """body{font-family:'DejaVu Sans',Arial,sans-serif;max-width:1040px;margin:16px auto;font-size:15px;line-height:1.45;color:#212529}
pre{background:#f6f8fa;padding:8px 10px;border-radius:4px;overflow-x:auto;font-size:13px}
code{font-family:'DejaVu Sans Mono',monospace;font-size:13px}
table{border-collapse:collapse;margin:8px 0;font-size:13.5px} th,td{border-bottom:1px solid #dee2e6;padding:4px 8px;text-align:left;vertical-align:top}
thead th{border-bottom:2px solid #adb5bd} table:not(.fastprogress):not(.dataframe) td:nth-child(4){width:50%} hr{border:0;border-top:1px solid #dee2e6;margin:20px 0 6px}
a{color:#0d6efd;text-decoration:none} img{max-width:100%} .out{margin:4px 0 14px}
pre.out{background:#fff;border-left:3px solid #dee2e6}"""


def _t(v): return ''.join(v) if isinstance(v, list) else v


def nb2md(nb, start: str) -> str:
    "Markdown of the processed notebook `nb` from the first cell containing `start` on."
    cells = nb['cells']
    i0 = next((i for i, c in enumerate(cells) if start in _t(c['source'])), None)
    if i0 is None:
        print(f'warning: no cell contains {start!r}; the screenshot starts at the top of the page (edit SHOTS)', file=sys.stderr)
        i0 = 0
    out = []
    for c in cells[i0:]:
        s = _t(c['source'])
        if c['cell_type'] == 'markdown': out.append(s); continue
        if c['cell_type'] != 'code': continue
        if not re.search(r'(?m)^#\|\s*echo:\s*false', s):
            code = '\n'.join(l for l in s.splitlines() if not l.startswith('#|'))
            if code.strip(): out.append(f'```python\n{code}\n```')
        for o in c.get('outputs', []):
            d = o.get('data', {})
            if 'image/png' in d: out.append(f'<div class="out"><img src="data:image/png;base64,{_t(d["image/png"]).strip()}"></div>')
            elif 'text/markdown' in d: out.append(_t(d['text/markdown']))
            elif 'text/html' in d: out.append(f'<div class="out">\n{_t(d["text/html"])}\n</div>')
            elif 'text/plain' in d or o.get('output_type') == 'stream':
                txt = _t(d.get('text/plain', o.get('text', '')))
                out.append('<pre class="out">' + txt.replace('&', '&amp;').replace('<', '&lt;') + '</pre>')
    return '\n\n'.join(out)


def main():
    proc = ROOT/'_proc'
    if not proc.exists(): sys.exit('no _proc/: run `python tools/nbcheck.py --proc` first')
    for tool in ('pandoc', 'chromium'):
        if not shutil.which(tool): sys.exit(f'{tool} not found (Debian: apt-get install -y pandoc chromium)')
    from PIL import Image
    tmp = Path(tempfile.mkdtemp())
    (tmp/'style.css').write_text(CSS)
    for nbname, start, name, height in SHOTS:
        nb = json.loads((proc/nbname).read_text(encoding='utf-8'))
        title = _t(nb['cells'][0]['source']).splitlines()[0].lstrip('# ') if nb['cells'] else nbname
        md = tmp/f'{name}.md'
        md.write_text(nb2md(nb, start), encoding='utf-8')
        html = tmp/f'{name}.html'
        subprocess.run(['pandoc', '-f', 'markdown-yaml_metadata_block', '-t', 'html5', '--standalone', '--css', 'style.css',
                        '--metadata', f'pagetitle={title}', '-o', str(html), str(md)], check=True, cwd=tmp)
        png = tmp/f'{name}.png'
        subprocess.run(['chromium', '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                        '--disable-background-networking', '--disable-component-update', '--disable-sync',
                        '--hide-scrollbars', f'--user-data-dir={tempfile.mkdtemp()}', f'--screenshot={png}',
                        f'--window-size={WIDTH},{height}', '--force-device-scale-factor=1', html.as_uri()],
                       check=True, cwd=tmp, capture_output=True, timeout=120)
        dest = ROOT/'docs'/f'{name}.png'
        Image.open(png).convert('RGB').quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dest, optimize=True)
        print(f'{dest.relative_to(ROOT)}: {dest.stat().st_size/1e3:.0f} kB ({nbname} from {start!r})')


if __name__ == '__main__': main()
