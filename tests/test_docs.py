"""The documentation checker (tools/nbcheck.py) finds each defect it is meant to find, fixes the mechanical ones
idempotently, and passes on nbs/; the show_doc renderer writes class signatures, parameter tables, readable defaults."""
import importlib.util, json, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('nbcheck', ROOT/'tools'/'nbcheck.py')
nbcheck = importlib.util.module_from_spec(spec); spec.loader.exec_module(nbcheck)


def _code(s, outputs=None, id='c'): return dict(cell_type='code', source=s, metadata={}, outputs=outputs or [], execution_count=None, id=id)
def _md(s, id='m'): return dict(cell_type='markdown', source=s, metadata={}, id=id)

PNG = {'output_type': 'display_data', 'metadata': {}, 'data': {'image/png': 'iVBORw0KGgo=', 'text/plain': ['<Figure>']}}


def _fixture(path):
    cells = [
        _md('# Fixture\n\n> a notebook with each defect', 'm0'),
        _code('#| export\nimport math\n\n# the answer\ndef f(x): return math.sqrt(x)\nimport os\nY = os.sep', id='e1'),
        _code('test_eq(f(4), 2)\nassert f(9) == 3', id='t1'),                    # check cell after code: hide it
        _md('An example the prose introduces:', 'm1'),
        _code('test_eq(f(16), 4)', id='t2'),                                       # stays visible
        _code('import pandas as pd\npd.DataFrame(learn.history).tail()', id='x1'),  # mixed: crashes nbdev's processing
        _code('learn.recorder.plot_loss();', id='p1'),                             # plot without image
        _code('ax.plot([1, 2]);', [PNG], id='p2'),                                 # plot with image: fine
        _code('#| export\ndef plot(self): plt.plot([1])', id='e2'),                 # defines a plot: not a plot cell
        _md('As SPEC §2 says, ...', 'm2'),
        _code('%matplotlib inline\nimport numpy as np', id='g1'),                  # magic + import: mixed
    ]
    nb = dict(cells=cells, metadata={'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
              nbformat=4, nbformat_minor=5)
    p = path/'fixture.ipynb'
    nbcheck.write_nb(nb, p)
    return p


def _kinds(probs): return sorted((i, k) for _, i, k, _ in probs)


def test_check_finds_each_defect(tmp_path):
    p = _fixture(tmp_path)
    assert _kinds(nbcheck.check_nb(p)) == [(1, 'mixed-imports'), (2, 'visible-test'), (5, 'mixed-imports'),
                                           (6, 'no-plot-output'), (9, 'external-ref'), (10, 'mixed-imports')]
    assert nbcheck.main(['--check', '--nbs', str(tmp_path)]) == 1


def test_fix_splits_imports_hides_checks_idempotently(tmp_path):
    p = _fixture(tmp_path)
    probs = nbcheck.check_nb(p, fix=True)
    assert _kinds(probs) == [(10, 'no-plot-output'), (13, 'external-ref')]   # what needs a run or an author
    once = p.read_text()
    nbcheck.check_nb(p, fix=True)
    assert p.read_text() == once
    cells = json.loads(once)['cells']
    srcs = [nbcheck.src(c) for c in cells]
    # the export cell: three parts in the original order, each keeping `#| export`; the comment goes with its def
    assert srcs[1] == '#| export\nimport math'
    assert srcs[2] == '#| export\n# the answer\ndef f(x): return math.sqrt(x)'
    assert srcs[3] == '#| export\nimport os' and srcs[4] == '#| export\nY = os.sep'
    assert srcs[5] == '#| hide\ntest_eq(f(4), 2)\nassert f(9) == 3'
    assert srcs[7] == 'test_eq(f(16), 4)'
    assert srcs[8:10] == ['import pandas as pd', 'pd.DataFrame(learn.history).tail()']
    assert srcs[14:16] == ['%matplotlib inline', 'import numpy as np']
    assert len({c['id'] for c in cells}) == len(cells)
    # the exported code is the same statements in the same order
    exported = '\n'.join(s.replace('#| export\n', '') for s in srcs if s.startswith('#| export'))
    assert exported.replace('\n', '') == 'import math# the answerdef f(x): return math.sqrt(x)import osY = os.sepdef plot(self): plt.plot([1])'


def test_links_of_processed_notebooks(tmp_path):
    nbs, proc = tmp_path/'nbs', tmp_path/'_proc'
    nbs.mkdir(); proc.mkdir()
    for n in ['02_core.ipynb', 'index.ipynb']: (nbs/n).write_text('{}')
    site = 'https://fastsprkd.github.io/fastsprkd/'
    md = (f'[ok]({site}core.html#hessianoperator) [ok]({site}core.html.md) [ok](core.html) [ok](#local) '
          f'[ok](https://docs.fast.ai/learner.html) [ok](https://github.com/fastsprkd/fastsprkd/blob/main/README.md) '
          f'[dead]({site}nbs/core.html#x) [dead](observe.html) '
          f'[dead](https://github.com/fastsprkd/fastsprkd/tree/main/nbs/core.html#y) [ok]({site})')
    nb = dict(cells=[_md(md), _code('x', [{'output_type': 'display_data', 'metadata': {},
                                             'data': {'text/markdown': f'<a href="{site}eigen.html">dead</a>'}}])],
              metadata={}, nbformat=4, nbformat_minor=5)
    nbcheck.write_nb(nb, proc/'02_core.ipynb')
    probs = nbcheck.check_links(proc, nbs, root=ROOT)
    assert [k for _, _, k, _ in probs] == ['dead-link'] * 4, probs
    assert sorted(m.split(': no ')[0] for _, _, _, m in probs) == sorted([
        f'{site}nbs/core.html#x', 'observe.html', f'{site}eigen.html',
        'https://github.com/fastsprkd/fastsprkd/tree/main/nbs/core.html#y'])


def test_nbs_pass_the_check():
    "The notebooks of the repository: no mixed import cells, visible check cells, plots without images, external refs."
    probs = [o for p in nbcheck.nb_files(ROOT/'nbs') for o in nbcheck.check_nb(p)]
    assert not probs, '\n'.join(f'{p.name} cell {i}: [{k}] {m}' for p, i, k, m in probs)


def test_show_doc_renderer():
    from fastsprkd._showdoc import DocRenderer, fmt_default
    from fastsprkd.core import HessianOperator
    md = DocRenderer(HessianOperator)._repr_markdown_()
    assert '```python\nclass HessianOperator(' in md and 'def HessianOperator' not in md
    assert 'memory_budget:int=2**30' in md and 'NoneType' not in md and '1073741824' not in md
    assert '| memory_budget | int | `2**30` | bytes that one vectorized chunk' in md
    m = DocRenderer(HessianOperator.to_dense)._repr_markdown_()
    assert 'def HessianOperator.to_dense(max_bytes:int | None=None) -> Tensor' in m and '(self' not in m
    assert [fmt_default(o) for o in (2**31, 1000, None, 'auto', 1e-5, print)] == ['2**31', '1000', 'None', "'auto'", '1e-05', 'print']


def test_home_page_holds_the_readme():
    "nbs/index.ipynb is README.md with links for the site; README.md itself is never regenerated by nbdev."
    assert nbcheck.check_index(ROOT) == [], 'run python tools/nbcheck.py --fix'
    nb = nbcheck.index_nb(ROOT)
    text = '\n'.join(nbcheck.src(c) for c in nb['cells'])
    readme = (ROOT/'README.md').read_text()
    assert nbcheck.src(nb['cells'][0]).startswith(readme.splitlines()[0] + '\n\n> ')
    assert '](docs/' not in text and '](nbs/' not in text
    if '](docs/demo_teacher_spectrum.png)' in readme:
        assert '](https://github.com/fastsprkd/fastsprkd/raw/main/docs/demo_teacher_spectrum.png)' in text
    if '`00_data.ipynb`' in readme: assert '[`00_data.ipynb`](data.html)' in text
    from nbdev.config import get_config
    cfg = get_config(ROOT)
    assert not (cfg.nbs_path/cfg.readme_nb).exists(), 'readme_nb must not exist, or nbdev-prepare overwrites README.md'


def test_module_docstrings_point_at_pages_of_the_site():
    from nbdev.config import get_config
    cfg = get_config(ROOT)
    site = cfg.doc_host + cfg.doc_baseurl.rstrip('/') + '/'
    assert site == 'https://fastsprkd.github.io/fastsprkd/'
    pages = nbcheck.site_pages(ROOT/'nbs')
    mods = [p for p in (ROOT/'fastsprkd').rglob('*.py') if 'AUTOGENERATED' in p.read_text()[:2000]]
    assert len(mods) >= 8
    for p in mods:
        url = next(l[5:].strip().rstrip('"') for l in p.read_text().splitlines() if l.startswith('Docs:'))
        assert url.startswith(site) and url[len(site):].removesuffix('.md') in pages, (p, url)
