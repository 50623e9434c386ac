"The experiment on the user's data and models: a 1-D CNN on a tiny synthetic set, every ablation arm, two budgets."
import json, math
import pytest, torch
from torch import nn
import fastcore.test as fct
from fastsprkd.data import tensor_dls
from fastsprkd.experiment import StoryConfig, ARMS, run_experiment, evaluate_student, sprkd_events, train_student, make_task


class Tiny1d(nn.Module):
    "Conv1d(1→w, 3) → ReLU → flatten → Linear(w·12 → 3): the same parameter names at every width."
    def __init__(self, width):
        super().__init__(); self.width = width
        self.conv = nn.Conv1d(1, width, 3, padding=1); self.head = nn.Linear(width * 12, 3)
    def forward(self, x): return self.head(torch.relu(self.conv(x)).flatten(1))


def _dls_fn(seed):
    g = torch.Generator().manual_seed(123)  # the same data for every seed
    y = torch.randint(0, 3, (96,), generator=g)
    x = torch.randn(96, 1, 12, generator=g) * 0.5 + y.view(-1, 1, 1).float()
    return tensor_dls(x, y, torch.arange(64), torch.arange(64, 96), bs=16, device='cpu')


def test_run_experiment_user_data_all_arms(tmp_path):
    cfg = StoryConfig(arms=ARMS, capture_every=2, n_probe=32, trace_matvecs=6, sprkd_n_probe=16, sprkd_max_matvecs=8, generosity=2)
    res = run_experiment(tmp_path/'exp', cfg, seeds=2, progress=False, budgets=(1, 2), dls_fn=_dls_fn,
                         teacher_fn=lambda: Tiny1d(6), student_fn=lambda: Tiny1d(3))
    fct.test_eq(len(res['runs']), 4)  # 2 budgets × 2 seeds
    for r in res['runs']:
        fct.test_eq(set(r['metrics']), {'teacher', *ARMS})
        for k in ARMS: assert math.isfinite(r['metrics'][k]['valid_accuracy']) and math.isfinite(r['metrics'][k]['hessian_trace'])
        fct.test_eq(r['metrics']['control']['num_params'], 3 * 3 + 3 + 3 * 36 + 3)
        fct.test_eq(r['metrics']['teacher']['num_params'], 6 * 3 + 6 + 3 * 72 + 3)
        assert r['metrics']['approach']['sprkd_eigenstep'] == 0 and r['metrics']['approach']['sprkd_perturb'] == 0
        assert r['metrics']['warm']['teacher_train_seconds'] == r['metrics']['teacher']['train_seconds']
    s = res['summary']
    fct.test_eq(s['budgets'], [1, 2])
    pairs = {(t['a'], t['b']) for t in s['tests']}
    fct.test_eq(pairs, {('sprkd', 'control'), ('sprkd', 'kd'), ('sprkd', 'warm'), ('sprkd', 'approach'), ('warm', 'control'),
                        ('approach', 'warm')})
    fam = [t for t in s['tests'] if not t['metric'].endswith('seconds')]
    assert all(t['family'] == len(fam) == 2 * 6 * 5 for t in s['tests'])  # Holm over both budgets' model metrics
    md = (tmp_path/'exp'/'experiment.md').read_text()
    for want in ('Tiny1d(6) (243 parameters)', 'Tiny1d(3) (123 parameters)', 'user data', '(64 training items)',
                 'seeds: 1 epoch\n', 'seeds: 2 epochs\n', 'teacher warm start', 'approach only', "teacher's training (s)",
                 'SPRKD vs teacher warm start: Δacc ='):
        assert want in md, want
    json.loads((tmp_path/'exp'/'experiment.json').read_text())


def test_evaluate_any_learner():
    "evaluate_student / sprkd_events on a plain Learner: no hand-set attributes."
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    learn = Learner(_dls_fn(0), Tiny1d(3), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    m = evaluate_student(learn, trace_matvecs=6)
    assert math.isnan(m['train_seconds']) and math.isfinite(m['hessian_trace']) and 0 <= m['valid_accuracy'] <= 1
    fct.test_eq(sprkd_events(learn), {})


def test_warm_start_starts_from_the_teacher_crop():
    "The warm-start student's initial weights are the layout-aware crop of the teacher's final weights (lr ≈ 0: no move)."
    from fastsprkd.saddle import crop_params
    cfg = StoryConfig(epochs=1, lr=1e-12)
    task = make_task(cfg, dls_fn=_dls_fn, teacher_fn=lambda: Tiny1d(6), student_fn=lambda: Tiny1d(3))
    torch.manual_seed(0); teacher = Tiny1d(6)
    learn = train_student('warm', cfg, 0, teacher=teacher, progress=False, task=task)
    want = crop_params(dict(teacher.named_parameters()), Tiny1d(3))
    for n, p in learn.model.named_parameters(): torch.testing.assert_close(p.detach(), want[n].detach(), atol=1e-6, rtol=0)
    # head.weight keeps channels 1..3 of the conv, every one of the 12 positions
    torch.testing.assert_close(learn.model.head.weight.detach(), teacher.head.weight.detach().view(3, 6, 12)[:, 1:4].reshape(3, 36), atol=1e-6, rtol=0)


def test_run_story_with_learner_factories():
    "Factories may return whole Learners (their own data, loss and metrics); the report names the models and the data."
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from fastsprkd.experiment import run_story
    mk = lambda w: Learner(_dls_fn(0), Tiny1d(w), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    st = run_story(StoryConfig(epochs=1, arms=('control', 'warm'), capture_every=2, n_probe=32, trace_matvecs=6), 0,
                   progress=False, spectrum=False, teacher_fn=lambda: mk(6), student_fn=lambda: mk(3))
    fct.test_eq(set(st.metrics), {'teacher', 'control', 'warm'})
    fct.test_eq(st.probe_items, 32)
    d = st.describe()
    fct.test_eq((d['teacher'], d['student'], d['train_items']), ('Tiny1d(6) (243 parameters)', 'Tiny1d(3) (123 parameters)', 64))
    fct.test_eq(d['data'], "the Learner factories' own data")


@pytest.mark.parametrize('extra,expect', [(['--arms', 'control,foo'], 'arms must be distinct names'),
                                          (['--budgets', '3,x'], '--budgets must be a comma-separated list'),
                                          (['--budgets', '0'], '--budgets must be a comma-separated list'),
                                          (['--dataset', 'mnist1d', '--data-dir', '.'], 'only read for the mnist dataset')])
def test_cli_bad_ablation_input(tmp_path, capsys, extra, expect):
    from fastsprkd.cli import main
    code = main(['experiment', '--out', str(tmp_path/'out')] + extra)
    err = capsys.readouterr().err
    fct.test_eq(code, 1)
    assert expect in err and 'Traceback' not in err, err
    fct.test_eq(list(tmp_path.iterdir()), [])
