"`fastsprkd demo` / `fastsprkd experiment` end to end on tiny budgets, and their handling of bad input."
import json, math, os, struct, sys
from pathlib import Path
import pytest, torch
import fastcore.test as fct
from fastsprkd.cli import main
from fastsprkd import experiment as ex
from fastsprkd.experiment import StoryConfig, STUDENTS, METRICS, MARKER

TINY = ['--epochs', '1', '--n-probe', '64', '--trace-matvecs', '12']

def _run(capsys, argv):
    try: code = main(argv)
    except SystemExit as e: code = e.code
    out, err = capsys.readouterr()
    return code, out, err

def _finite(x): return isinstance(x, (int, float)) and math.isfinite(x)

def _strict_json(path):
    "Parse as standard JSON: NaN/Infinity tokens (which strict parsers reject) fail the test."
    def refuse(tok): raise AssertionError(f"{path.name} holds the non-standard JSON token {tok}")
    return json.loads(path.read_text(), parse_constant=refuse)

def test_experiment_two_seeds(tmp_path, capsys):
    out = tmp_path/'exp'
    code, stdout, err = _run(capsys, ['experiment', '--seeds', '2', '--n-train', '300', '--out', str(out)] + TINY)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['exp']  # no temporary directory left
    assert {p.name for p in out.iterdir()} == {'experiment.json', 'experiment.md', 'runs.csv', MARKER}
    res = _strict_json(out/'experiment.json')
    fct.test_eq(res['seeds'], [0, 1])
    fct.test_eq([r['seed'] for r in res['runs']], [0, 1])
    for r in res['runs']:
        fct.test_eq(set(r['metrics']), {'teacher', *STUDENTS})
        for kind in STUDENTS:
            for m in METRICS: assert _finite(r['metrics'][kind][m]), (r['seed'], kind, m, r['metrics'][kind][m])
            assert 0 <= r['metrics'][kind]['valid_accuracy'] <= 1
    table = res['summary']['table']
    for kind in STUDENTS:
        for m in METRICS:
            c = table[kind][m]
            fct.test_eq(c['n'], 2)
            assert _finite(c['mean']) and _finite(c['std']), (kind, m, c)
            fct.test_close(c['mean'], sum(c['values']) / 2, eps=1e-9)
    tests = res['summary']['tests']
    fct.test_eq(sorted({(t['a'], t['b']) for t in tests}), [('sprkd', 'control'), ('sprkd', 'kd')])
    fct.test_eq(len(tests), 2 * len(METRICS))
    for t in tests:
        assert _finite(t['mean_diff'])
        assert (t['p_holm'] is None) == t['metric'].endswith('seconds')  # timings are outside Holm's family: null, not NaN
        assert 'α = 0.05' in t['verdict'] or 'not testable' in t['verdict']
    md = (out/'experiment.md').read_text()
    assert 'Mean ± standard deviation over 2 seeds' in md and 'Paired comparisons' in md
    assert 'fixed probe set of 64 training items' in md  # TINY's --n-probe 64
    assert 'report: ' + str(out/'experiment.md') in stdout

def test_demo_writes_everything(tmp_path, capsys):
    out = tmp_path/'demo'
    code, stdout, err = _run(capsys, ['demo', '--n-train', '704', '--out', str(out)] + TINY)  # 11 steps: one saddle test
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['demo']
    names = {p.name for p in out.iterdir()}
    want = {'report.md', 'report.html', 'metrics.json', 'metrics.csv', 'saddle_bank', MARKER, 'training_curves.png',
            'teacher_spectrum.png', 'spectral_density.png', 'loss_landscape.png', 'sprkd_student.png'}
    fct.test_eq(names, want)
    for png in [n for n in names if n.endswith('.png')]: assert (out/png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (out/'saddle_bank'/'manifest.json').exists()
    data = _strict_json(out/'metrics.json')
    fct.test_eq(out.stat().st_mode & 0o777, 0o777 & ~_umask())  # the permissions of a plain mkdir, not mkdtemp's 0700
    for kind in STUDENTS:
        for m in METRICS: assert _finite(data['metrics'][kind][m]), (kind, m)
    fct.test_eq(data['saddle_capture']['tests'], 1)
    fct.test_eq(len(data['teacher_spectrum']), 1)  # λ_max, λ_min at the one epoch end
    assert _finite(data['teacher_spectrum'][0]['lambda_max'])
    fct.test_eq(data['metrics']['teacher']['saddle_points'], data['saddle_capture']['captured'])
    csv_rows = (out/'metrics.csv').read_text().splitlines()
    fct.test_eq(csv_rows[0], 'model,metric,value')
    assert any(r.startswith('sprkd,hessian_trace,') for r in csv_rows)
    md, page = (out/'report.md').read_text(), (out/'report.html').read_text()
    for n in data['plots']: assert f']({n})' in md and f'src="{n}"' in page
    assert 'student: SPRKD' in md and '<table>' in page
    assert 'fixed probe set of 64 training items' in md
    fct.test_eq(data['saddle_capture']['probe_items'], 128)  # SaddleCaptureCallback's default probe
    if data['saddle_capture']['captured'] == 0: assert 'The teacher captured no saddle point' in md
    else: assert f"The teacher captured **{data['saddle_capture']['captured']} saddle points**" in md
    assert 'report: ' + str(out/'report.md') in stdout
    # a second run replaces its own previous report
    code, _, err = _run(capsys, ['demo', '--n-train', '128', '--out', str(out), '--epochs', '1', '--n-probe', '256',
                                 '--trace-matvecs', '12'])
    assert code == 0, err
    fct.test_eq(sorted(p.name for p in tmp_path.iterdir()), ['demo'])
    fct.test_eq(json.loads((out/'metrics.json').read_text())['config']['n_train'], 128)
    assert 'fixed probe set of 128 training items' in (out/'report.md').read_text()  # 256 asked, 128 exist

def _umask():
    m = os.umask(0); os.umask(m)
    return m

def test_failed_swap_keeps_the_previous_report(tmp_path, monkeypatch):
    "A failure between moving the old report aside and moving the new one in puts the old one back."
    with ex.atomic_output_dir(tmp_path/'out') as t: (t/'report.md').write_text('previous')
    rename = Path.rename
    def flaky(self, target):
        if self.name.endswith('.tmp'): raise OSError(28, 'No space left on device (simulated)')
        return rename(self, target)
    monkeypatch.setattr(Path, 'rename', flaky)
    with pytest.raises(OSError, match='simulated'):
        with ex.atomic_output_dir(tmp_path/'out') as t: (t/'report.md').write_text('new')
    fct.test_eq(sorted(p.name for p in tmp_path.iterdir()), ['out'])
    fct.test_eq((tmp_path/'out'/'report.md').read_text(), 'previous')

def _unwritable(tmp_path):
    "A directory this process cannot write into (root ignores permissions: use /proc on Linux)."
    if os.geteuid() != 0:
        d = tmp_path/'ro'; d.mkdir(); d.chmod(0o500)
        return d/'out'
    if sys.platform.startswith('linux'): return Path('/proc/fastsprkd-test-out')
    pytest.skip("no unwritable directory available to root on this platform")

@pytest.mark.parametrize('case', ['unknown_dataset', 'mnist_no_files', 'mnist_no_dir', 'out_under_file', 'out_unwritable',
                                  'out_foreign_dir', 'bad_epochs', 'one_seed', 'n_train_below_batch', 'few_trace_matvecs',
                                  'mnist_corrupt', 'data_dir_with_digits'])
def test_bad_input(tmp_path, capsys, case):
    out = tmp_path/'out'
    cmd, expect, code_want = 'demo', None, 1
    extra = []
    if case == 'unknown_dataset': extra, expect, code_want = ['--dataset', 'cifar10'], "invalid choice: 'cifar10'", 2
    elif case == 'mnist_no_files':
        (tmp_path/'empty').mkdir()
        extra, expect = ['--dataset', 'mnist', '--data-dir', str(tmp_path/'empty')], 'MNIST files not found'
    elif case == 'mnist_no_dir': extra, expect = ['--dataset', 'mnist'], '--data-dir'
    elif case == 'out_under_file':
        (tmp_path/'afile').write_text('x'); out = tmp_path/'afile'/'out'; expect = 'is not a directory'
    elif case == 'out_unwritable': out = _unwritable(tmp_path); expect = 'cannot write the output directory'
    elif case == 'out_foreign_dir':
        out.mkdir(); (out/'thesis.tex').write_text('keep me'); expect = 'not written by fastsprkd'
    elif case == 'bad_epochs': extra, expect = ['--epochs', '0'], 'epochs must be a positive integer'
    elif case == 'data_dir_with_digits': extra, expect = ['--data-dir', str(tmp_path)], 'only read for the mnist dataset'
    elif case == 'n_train_below_batch': extra, expect = ['--n-train', '10'], 'n_train (10) is smaller than one batch (bs=64)'
    elif case == 'few_trace_matvecs': extra, expect = ['--trace-matvecs', '5'], 'trace_matvecs must be an integer ≥ 6'
    elif case == 'mnist_corrupt':
        raw = tmp_path/'mn'/'MNIST'/'raw'; raw.mkdir(parents=True)
        for n in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'):
            (raw/n).write_bytes(bytes(range(100)))
        extra, expect = ['--dataset', 'mnist', '--data-dir', str(tmp_path/'mn')], 'could not be read'
    elif case == 'one_seed': cmd, extra, expect = 'experiment', ['--seeds', '1'], '--seeds must be at least 2'
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = _run(capsys, [cmd, '--out', str(out)] + TINY + extra)  # extra last: it overrides TINY
    fct.test_eq(code, code_want)
    assert expect in err, err
    assert 'Traceback' not in err
    fct.test_eq(sorted(p.name for p in tmp_path.iterdir()), before)  # nothing written
    if case == 'out_foreign_dir': fct.test_eq([p.name for p in out.iterdir()], ['thesis.tex'])
    if case == 'out_unwritable': assert not out.exists()

def test_failure_mid_run_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs): raise RuntimeError('simulated failure during training')
    monkeypatch.setattr(ex, 'run_story', boom)
    with pytest.raises(RuntimeError, match='simulated'): main(['demo', '--out', str(tmp_path/'a'/'demo')] + TINY)
    fct.test_eq(list(tmp_path.iterdir()), [])

def _write_idx(path, arr, magic):
    with open(path, 'wb') as f:
        f.write(struct.pack('>I', magic) + b''.join(struct.pack('>I', s) for s in arr.shape))
        f.write(arr.numpy().astype('uint8').tobytes())

def test_mnist_from_files(tmp_path):
    "MNIST read from torchvision-layout files (synthetic ones here) trains a 28×28 student with the same layer names."
    raw = tmp_path/'MNIST'/'raw'; raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 96), ('t10k', 32)):
        _write_idx(raw/f'{split}-images-idx3-ubyte', torch.randint(0, 256, (n, 28, 28), generator=g), 0x803)
        _write_idx(raw/f'{split}-labels-idx1-ubyte', torch.randint(0, 10, (n,), generator=g), 0x801)
    cfg = StoryConfig(dataset='mnist', data_dir=str(tmp_path), epochs=1, n_train=64, bs=32)
    dls = ex.load_data(cfg)
    fct.test_eq(len(dls.train_ds), 64); fct.test_eq(len(dls.valid_ds), 32)
    learn = ex.train_student('control', cfg, 0, progress=False)
    fct.test_eq(learn.model.fc.in_features, 2 * cfg.student_width * 7 * 7)
    assert len(learn.curves['values']) == 1 and math.isfinite(learn.curves['values'][0][0])

def test_sprkd_student_recruits_from_a_teacher_bank():
    "With a non-empty bank the SPRKD student first approaches the centre crop of the teacher's point, then trains."
    from fastsprkd.saddle import SaddleBank, SaddlePoint
    torch.manual_seed(1)
    teacher = ex.make_model(32)
    bank = SaddleBank([SaddlePoint.from_model(teacher, eigenvalues=[-1., 5.], loss=0.5)])
    cfg = StoryConfig(epochs=1, n_train=256, bs=32)
    learn = ex.train_student('sprkd', cfg, 0, bank=bank, progress=False)
    ev = ex.sprkd_events(learn)
    assert ev['approach'] > 0 and ev['arrived'], ev
    fct.test_eq(ev['steps'], 8)
    hist = learn.recruit.history
    arrived = next(r for r in hist if r['event'] == 'arrived')
    assert arrived['distance'] <= learn.recruit.epsilon
    with pytest.raises(ValueError, match='needs the teacher'): ex.train_student('sprkd', cfg, 0, progress=False)
    with pytest.raises(ValueError, match="unknown student 'x'"): ex.train_student('x', cfg, 0, progress=False)

@pytest.mark.skipif(sys.platform == 'win32', reason="POSIX signals")
def test_sigterm_mid_run_leaves_nothing(tmp_path, monkeypatch, capsys):
    import signal
    before = signal.getsignal(signal.SIGTERM)
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError('SIGTERM should have interrupted the run')
    monkeypatch.setattr(ex, 'run_story', killed)
    code, _, err = _run(capsys, ['demo', '--out', str(tmp_path/'demo')] + TINY)
    fct.test_eq(code, 130)
    assert 'interrupted; nothing was written' in err
    fct.test_eq(list(tmp_path.iterdir()), [])
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI restores the handler
