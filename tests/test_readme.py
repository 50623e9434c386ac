"The README's quickstart runs as written (it is the first code a user copies)."
import re
from pathlib import Path


def test_readme_quickstart_runs():
    text = (Path(__file__).parent.parent / 'README.md').read_text()
    code = re.search(r"```python\n(.*?)```", text.split('## Quickstart', 1)[1], re.S).group(1)
    assert 'HessianOperator' in code and 'sprkd_student' in code
    code = code.replace("learn.hessian_spectrum.plot()", "ax = learn.hessian_spectrum.plot()")
    ns = {}
    exec(compile(code, 'README.md quickstart', 'exec'), ns)
    h = ns['learn'].hessian_spectrum.history
    assert h and all(r['lambda_max'] > 0 and r['lambda_min'] is not None for r in h)
    assert ns['ax'].get_xlabel()
    assert len(ns['teacher'].saddle_capture.bank) > 0
    assert len(ns['student'].saddle_recruit.history) > 0
    infl = ns['infl']
    assert infl.scores.shape == (len(ns['dls'].train_ds), 2) and infl.helpful.shape == (2, 4) and infl.result.converged
