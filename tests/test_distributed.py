"""Distributed curvature (issue 8): `HessianOperator`, the estimators and the callbacks across 2 CPU ranks (gloo), spawned by
the test, against single-process computations on the whole data in float64. One spawn runs every check (start-up is slow)
and saves each rank's results; the tests compare them. A second, light spawn checks that a failing rank fails the run.

fastai 2.8's `learn.distrib_ctx()`/`DistributedTrainer` cannot run here: `fastai.distributed` needs the `accelerate` package to
import at all, and its `DistributedDL` broadcasts the shuffled indices as CUDA tensors (NCCL only). The fits below therefore wrap
the model in `DistributedDataParallel` in a small callback (as `DistributedTrainer` does) and give each rank a loader that, like
`DistributedDL`, keeps the whole dataset and reads its share of an identically seeded permutation."""
import datetime, os, socket, time, traceback, warnings
from pathlib import Path
import pytest, torch
import torch.distributed as dist
import torch.multiprocessing as mp
import fastcore.test as fct

WORLD = 2
N_OP = 161          # digits items of the operator checks: rank 0 holds 80, rank 1 holds 81 (uneven on purpose)
N_FIT = 160         # training items of the distributed fit (80 per rank, 5 steps of 16)
PROBE = dict(every=2, k=2, n_probe=64, criterion='ratio', ratio=0., tol=1e-2, max_matvecs=16, seed=0)
LANCZOS = dict(tol=1e-6, max_matvecs=200, seed=0)
TRACE = dict(method='hutch++', num_matvecs=30, seed=0)


# ---------------------------------------------------------------- spawning with timeouts
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def _entry(rank, fn, port, out, args):
    "Runs in each spawned rank: one thread, a gloo group on 127.0.0.1 whose collectives time out, then `fn`; errors go to a file."
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try: fn(rank, Path(out), *args)
    except BaseException:  # written before the group closes, i.e. before the other ranks fail because of it
        (Path(out)/f'error{rank}.txt').write_text(traceback.format_exc())
        raise
    finally: dist.destroy_process_group()

def spawn(fn, out, *args, timeout:float=240.):
    """Run `fn(rank, out, *args)` on `WORLD` spawned processes. A rank that raises fails this call with the tracebacks of all
    failed ranks (torch terminates the others); a run longer than `timeout` seconds is killed and fails with `TimeoutError`."""
    ctx = mp.start_processes(_entry, args=(fn, _free_port(), str(out), args), nprocs=WORLD, join=False, start_method='spawn')
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline: raise TimeoutError(f"the {WORLD} ranks did not finish within {timeout:.0f} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        errors = sorted(Path(out).glob('error*.txt'))
        if not errors: raise
        raise RuntimeError('\n'.join(f"rank {f.stem[5:]} failed:\n{f.read_text()}" for f in errors)) from e
    finally:
        for p in ctx.processes:
            if p.is_alive(): p.kill()


# ---------------------------------------------------------------- shared setup (imported lazily: spawn start-up is slow)
def _digits():
    from fastsprkd.data import digits_tensors, split_idxs
    x, y = digits_tensors()
    train, _ = split_idxs(len(x))
    return x[train].double(), y[train]

def _model(seed=0):
    from fastsprkd.models import DigitsCNN
    from fastsprkd.core import preserved_rng
    with preserved_rng():
        torch.manual_seed(seed)
        return DigitsCNN(width=2).double()  # 266 parameters

def _shards():
    "The operator checks' data: contiguous, unequal halves of the first `N_OP` items in batches of up to 32."
    x, y = _digits()
    cut = [0, N_OP // 2, N_OP]
    return [[(x[s:min(s + 32, b)], y[s:min(s + 32, b)]) for s in range(a, b, 32)] for a, b in zip(cut, cut[1:])]

def _vectors(n):
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)

def _fit_dls(rank=None):
    "Training loader over the first `N_FIT` training items (rank's share if `rank` is given), validation loader."
    from fastai.data.core import DataLoaders, TfmdDL
    from torch.utils.data import TensorDataset
    from fastai.torch_core import set_seed
    from fastsprkd.core import preserved_rng
    x, y = _digits()
    ds = TensorDataset(x[:N_FIT], y[:N_FIT])

    class ShardDL(TfmdDL):
        "CPU stand-in for fastai's `DistributedDL`: the whole dataset, this rank's share of each (identically seeded) permutation."
        def __len__(self): return (len(self.dataset) // WORLD) // self.bs
        def get_idxs(self):
            idxs = self.shuffle_fn(list(range(len(self.dataset))))  # same rng state on every rank: same permutation
            return idxs[rank::WORLD][:len(self) * self.bs]

    with preserved_rng():
        set_seed(0)  # fastai loaders seed their shuffling from Python's `random`
        train = (ShardDL if rank is not None else TfmdDL)(ds, bs=16, shuffle=True, drop_last=True, device='cpu', num_workers=0)
    valid = TfmdDL(TensorDataset(x[N_FIT:N_FIT + 64], y[N_FIT:N_FIT + 64]), bs=64, device='cpu', num_workers=0)
    return DataLoaders(train, valid)


# ---------------------------------------------------------------- what each rank does
def _checks(rank, out):
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    from fastai.callback.core import Callback
    from fastai.learner import Learner
    import fastai.callback.progress  # noqa: F401 (learn.no_bar)
    import fastsprkd.saddle
    from fastsprkd.core import HessianOperator
    from fastsprkd.eigen import eigsh
    from fastsprkd.estimators import trace
    from fastsprkd.callback.sprkd import SaddleCaptureCallback, SaddleRecruitCallback
    from fastsprkd.callback.observe import HessianSpectrumCallback, SharpnessCallback
    ce, res = nn.CrossEntropyLoss(), {}

    # 1. operator and estimators on this rank's shard of the digits
    model, data = _model(), _shards()[rank]
    op = HessianOperator(model, ce, data)
    v, V = _vectors(op.num_params)
    res.update(num_samples=op.num_samples, local=op.local_num_samples, world=op.world_size, loss=op.loss(), grad=op.gradient(),
               mv=op.matvec(v), mm=op.matmat(V), lmax=float(eigsh(op, 1, 'LA', **LANCZOS).eigenvalues[0]),
               lmin=float(eigsh(op, 1, 'SA', **LANCZOS).eigenvalues[0]), trace=trace(op, **TRACE).estimate, auto=dict(op._auto))
    res['dense'] = HessianOperator(model, ce, data, params=['conv1', 'conv2']).to_dense()  # 96×96, two modules
    res['mv_ddp'] = HessianOperator(DDP(model), ce, data).matvec(v)  # a DDP-wrapped model: unwrapped, same products
    res['local_mv'] = HessianOperator(model, ce, data, process_group=None).matvec(v)  # opt-out: this rank's data only
    res['group_mv'] = HessianOperator(model, ce, data, process_group=dist.new_group([0, 1])).matvec(v)  # an explicit group
    one_rank = _shards()[0] + _shards()[1] if rank == 0 else []  # rank 1 holds no data at all
    res['empty_mv'] = HessianOperator(model, ce, one_rank).matvec(v)
    from fastsprkd.core import GGNOperator, EFOperator
    res['ggn_mv'], res['ef_mv'] = GGNOperator(model, ce, data).matvec(v), EFOperator(model, ce, data).matvec(v)  # the other matrices: the same all-reduce

    # 2. a rank whose shard has a NaN loss raises there, and the other rank raises naming it (no hang)
    bad = data if rank == 0 else [(torch.full_like(data[0][0], float('nan')), data[0][1])]
    try: HessianOperator(model, ce, bad); res['nan'] = None
    except Exception as e: res['nan'] = (type(e).__name__, str(e))

    # 3. a short distributed fit with SaddleCaptureCallback: only rank 0 writes the bank
    class DDPCallback(Callback):
        "Wrap the model in DDP for the fit (what fastai's DistributedTrainer does with accelerate)."
        order = 11
        def before_fit(self): self.learn.model = DDP(self.model)
        def after_fit(self): self.learn.model = self.learn.model.module
        def after_loss(self): self.learn.loss = self.learn.loss.float()  # fastai's Recorder averages float32 losses
    writes, atomic_write = [], fastsprkd.saddle._atomic_write
    fastsprkd.saddle._atomic_write = lambda path, data: (writes.append(str(path)), atomic_write(path, data))
    cap = SaddleCaptureCallback(save_path=out/'bank', **PROBE)
    spec = HessianSpectrumCallback(k=2, n_probe=32, max_matvecs=20, trace_matvecs=6, params=['module.fc'])  # a name on the DDP model
    sharp = SharpnessCallback(every=2)
    learn = Learner(_fit_dls(rank), _model(1), loss_func=ce, lr=1e-2, cbs=[DDPCallback(), cap, spec, sharp])
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    res.update(history=cap.history, writes=writes, bank=[(p.step, p.eigenvalues, p.loss) for p in cap.bank],
               final=[p.detach().clone() for p in learn.model.parameters()], probe_sizes=[len(b[1]) for b in cap._probe],
               spectrum=[{k: v for k, v in r.items() if k != 'seconds'} for r in spec.history],
               sharpness=[{k: v for k, v in r.items() if k not in ('seconds', 'loss')} for r in sharp.history])

    # 3b. the default time-budget schedule with clocks that run differently on the two ranks, a probe set smaller than the
    #     ranks (rank 1's share is empty) and a plain parameter name on the DDP model: every rank measures at the same steps
    clock = [0.]
    class Tick(Callback):
        def after_batch(self): clock[0] += 1. + 2. * rank  # training time: rank 1's batches "take" 3× longer
    def clk(): clock[0] += 0.5; return clock[0]  # a measurement "takes" about 1
    spec2 = HessianSpectrumCallback(k=2, n_probe=1, max_matvecs=10, trace=False, params=['fc'], clock=clk)
    import fastsprkd.callback.observe as observe
    built, plain = [], observe.HessianOperator
    class Counted(plain):
        def __init__(self, *a, **kw): built.append(1); super().__init__(*a, **kw)
    observe.HessianOperator = Counted  # counts the operators the observer builds
    try:
        learn = Learner(_fit_dls(rank), _model(1), loss_func=ce, lr=1e-2, cbs=[DDPCallback(), Tick(), spec2])
        with learn.no_bar(), learn.no_logging(): learn.fit(4)
    finally: observe.HessianOperator = plain
    res.update(budget=[(r['step'], r['eigenvalues'], r['params_id']) for r in spec2.history], budget_ops=len(built))

    # 3c. a loss landscape whose far point overflows on rank 1's shard only: a NaN gap on every rank, no error, no hang
    from fastsprkd.analysis import loss_landscape
    with torch.random.fork_rng():
        torch.manual_seed(0); lin = nn.Linear(3, 2)
    lx = torch.zeros(4, 3) if rank == 0 else torch.full((4, 3), 1e3)
    d = torch.zeros(8); d[:6] = 1.  # moves the weight only: rank 0's logits stay the bias
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res['landscape'] = loss_landscape(lin, ce, [(lx, torch.zeros(4, dtype=torch.long))], directions=d,
                                          alphas=torch.tensor([0., 1e36])).losses

    # 4. a student recruited from the saved bank: approach, eigenstep and perturbation identical on both ranks
    dist.barrier()  # rank 0 has written the bank
    rec = SaddleRecruitCallback(out/'bank', generosity=2, epsilon=1e9, grad_threshold=1e9, cooldown=1, perturb_every=1, max_negative_eigensteps=2,
                                max_matvecs=20, n_probe=32, seed=0)
    student = Learner(_fit_dls(rank), _model(2), loss_func=ce, lr=1e-2, cbs=[DDPCallback(), rec])
    with student.no_bar(), student.no_logging(): student.fit(1)
    res.update(student=[{k: v for k, v in r.items() if k != 'loss'} for r in rec.history],  # 'loss': this rank's mini-batch
               student_final=[p.detach().clone() for p in student.model.parameters()])
    torch.save(res, out/f'rank{rank}.pt')

def _fails(rank, out):
    if rank == 1: raise ValueError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 waits for a rank that never comes


# ---------------------------------------------------------------- the tests
@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp('dist')
    spawn(_checks, out)
    return out, [torch.load(out/f'rank{r}.pt', weights_only=False) for r in range(WORLD)]

def _rel(a, b): return float((torch.as_tensor(a) - torch.as_tensor(b)).norm() / torch.as_tensor(b).norm())

def test_operator_matches_single_process(ranks):
    "λ_max, λ_min (eigsh), trace (seeded Hutch++), loss, gradient, matvec and matmat over 2 shards = full data in one process."
    from torch import nn
    from fastsprkd.core import HessianOperator
    from fastsprkd.eigen import eigsh
    from fastsprkd.estimators import trace
    _, rs = ranks
    shards = _shards()
    full = HessianOperator(_model(), nn.CrossEntropyLoss(), shards[0] + shards[1], mode='rev')
    v, V = _vectors(full.num_params)
    ref = dict(loss=full.loss(), grad=full.gradient(), mv=full.matvec(v), mm=full.matmat(V),
               lmax=float(eigsh(full, 1, 'LA', **LANCZOS).eigenvalues[0]), lmin=float(eigsh(full, 1, 'SA', **LANCZOS).eigenvalues[0]),
               trace=trace(full, **TRACE).estimate)
    assert ref['lmin'] < 0 < ref['lmax']
    ref['dense'] = HessianOperator(_model(), nn.CrossEntropyLoss(), shards[0] + shards[1], params=['conv1', 'conv2']).to_dense()
    for r, res in enumerate(rs):
        fct.test_eq((res['num_samples'], res['local'], res['world']), (N_OP, len(torch.cat([b[1] for b in shards[r]])), WORLD))
        for k, want in ref.items():
            assert _rel(res[k], want) < 1e-6, f"rank {r}: {k} = {res[k]} differs from the single-process {want}"
        for k in ('mv_ddp', 'group_mv', 'empty_mv'): assert _rel(res[k], ref['mv']) < 1e-6, k
        local = HessianOperator(_model(), nn.CrossEntropyLoss(), shards[r]).matvec(v)
        assert _rel(res['local_mv'], local) < 1e-12  # process_group=None: the rank's own data only
    for k in ('loss', 'grad', 'mv', 'mm', 'lmax', 'lmin', 'trace', 'dense'):  # every rank holds the same bits
        assert torch.equal(torch.as_tensor(rs[0][k]), torch.as_tensor(rs[1][k])), k
    fct.test_eq(rs[0]['auto'], rs[1]['auto'])  # 'auto' mode: one choice for all ranks

def test_budget_schedule_probe_share_and_names_agree_across_ranks(ranks):
    "Rank-dependent clocks, an empty probe share on rank 1, `params=['fc']` on a DDP model: one schedule, one operator."
    from fastsprkd.callback.core import params_id
    _, rs = ranks
    fct.test_eq(rs[0]['budget'], rs[1]['budget'])
    assert len(rs[0]['budget']) >= 2, rs[0]['budget']
    fct.test_eq({pid for *_, pid in rs[0]['budget']}, {params_id(['fc.weight', 'fc.bias'])})  # the plain model's names
    fct.test_eq([r['budget_ops'] for r in rs], [1, 1])  # one operator for the fit, not one per measurement

def test_landscape_gap_on_one_shard_is_a_gap_everywhere(ranks):
    _, rs = ranks
    for r in rs:
        assert torch.isfinite(r['landscape'][0]) and r['landscape'][1].isnan(), r['landscape']
    assert torch.equal(rs[0]['landscape'][0], rs[1]['landscape'][0])

def test_failing_shard_fails_every_rank(ranks):
    _, rs = ranks
    fct.test_eq(rs[1]['nan'][0], 'FloatingPointError')
    assert 'nan' in rs[1]['nan'][1].lower()
    fct.test_eq(rs[0]['nan'][0], 'RuntimeError')
    assert 'rank 1' in rs[0]['nan'][1]

def test_capture_in_distributed_fit(ranks):
    "One bank, written by rank 0; its eigenvalues equal a single-process computation over the whole probe set."
    from torch import nn
    from fastsprkd.core import HessianOperator
    from fastsprkd.eigen import eigsh
    from fastsprkd.saddle import SaddleBank, inject
    from fastsprkd.callback.sprkd import probe_batches
    out, rs = ranks
    fct.test_eq(rs[1]['writes'], [])
    fct.test_eq(len(rs[0]['writes']), 2)  # the tensor file and the manifest
    fct.test_eq(sorted(f.name for f in (out/'bank').iterdir() if f.name.endswith('.json')), ['manifest.json'])
    fct.test_eq(rs[0]['probe_sizes'], [PROBE['n_probe'] // WORLD])  # each rank holds its half of the probe set
    for k in ('history', 'bank', 'spectrum', 'sharpness'): fct.test_eq(rs[0][k], rs[1][k])  # identical on both ranks
    assert len(rs[0]['spectrum']) == 1 and len(rs[0]['sharpness']) >= 2
    for a, b in zip(rs[0]['final'], rs[1]['final']): assert torch.equal(a, b)
    bank = SaddleBank.load(out/'bank')
    assert len(bank) >= 1 and len(bank) == sum(r['captured'] for r in rs[0]['history'])
    fct.test_eq([p.step for p in bank], [s for s, _, _ in rs[0]['bank']])
    probe = probe_batches(_fit_dls().train, PROBE['n_probe'], PROBE['seed'], bs=PROBE['n_probe'])  # the whole probe set
    steps = [r['step'] for r in rs[0]['history']]
    for p in bank:
        model = inject(_model(1), p.params)
        op = HessianOperator(model, nn.CrossEntropyLoss(), probe)
        res = eigsh(op, PROBE['k'], 'BE', tol=PROBE['tol'], max_matvecs=PROBE['max_matvecs'], ncv=PROBE['max_matvecs'],
                    seed=PROBE['seed'] + steps.index(p.step))
        assert _rel(p.eigenvalues, res.eigenvalues) < 1e-6, (p.eigenvalues, res.eigenvalues.tolist())
        assert abs(p.loss - float(op.loss())) <= 1e-6 * abs(p.loss)

def test_student_moves_identical_on_all_ranks(ranks):
    _, rs = ranks
    events = [r['event'] for r in rs[0]['student']]
    assert {'arrived', 'eigenstep', 'perturb'} <= set(events) and ({'keep', 'revert'} & set(events)), events
    fct.test_eq(rs[0]['student'], rs[1]['student'])
    for a, b in zip(rs[0]['student_final'], rs[1]['student_final']): assert torch.equal(a, b)

def test_failing_rank_fails_the_test(tmp_path):
    "A rank that raises while the other waits in a collective fails the run with its error, quickly, instead of hanging."
    t0 = time.monotonic()
    with pytest.raises(Exception, match='rank 1 fails on purpose'): spawn(_fails, tmp_path, timeout=60)
    assert time.monotonic() - t0 < 50

def test_ggn_and_ef_match_single_process(ranks):
    "GGN- and EF-vector products over 2 shards = full data in one process, the same bits on every rank."
    from torch import nn
    from fastsprkd.core import GGNOperator, EFOperator
    _, rs = ranks
    shards = _shards()
    v, _ = _vectors(GGNOperator(_model(), nn.CrossEntropyLoss(), shards[0]).num_params)
    for k, cls in (('ggn_mv', GGNOperator), ('ef_mv', EFOperator)):
        want = cls(_model(), nn.CrossEntropyLoss(), shards[0] + shards[1]).matvec(v)
        for r, res in enumerate(rs): assert _rel(res[k], want) < 1e-6, f"rank {r}: {k}"
        assert torch.equal(rs[0][k], rs[1][k]), k
