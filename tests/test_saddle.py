"Saddle bank: selection, averaging, storage (round trip, atomicity, corruption), centre-crop injection."
import json, math, os, pickle
import pytest, torch
from torch import nn
import fastcore.test as fct
from fastsprkd.saddle import SaddlePoint, SaddleBank, SaddleBankError, centre_crop, crop_params, inject
from fastsprkd.models import DigitsCNN, DigitsMLP



class _LoadTimeout(BaseException): "Raised by the fuzz test's alarm: a load that blocks fails the test."

def _point(seed, loss, model=None, **kw):
    torch.manual_seed(seed)
    model = model or DigitsCNN(4)
    return SaddlePoint.from_model(model, loss=loss, eigenvalues=[-0.5 * seed, 3. + seed], grad_norm=0.01 * seed,
                                  step=100 * seed, epoch=seed, **kw)


@pytest.fixture
def bank():
    return SaddleBank([_point(1, 0.7), _point(2, 0.2, meta={'teacher': 'a', 'lr': 1e-3}), _point(3, 0.5), _point(4, 0.2)])


def _assert_same(b1, b2):
    assert len(b1) == len(b2)
    assert b1.fingerprint == b2.fingerprint
    for p, q in zip(b1, b2):
        assert list(p.params) == list(q.params)
        for n in p.params:
            assert p.params[n].dtype == q.params[n].dtype and torch.equal(p.params[n], q.params[n])
        for f in ('eigenvalues', 'grad_norm', 'step', 'epoch', 'meta'): assert getattr(p, f) == getattr(q, f)
        assert p.loss == q.loss or (math.isnan(p.loss) and math.isnan(q.loss))


def test_point_copies_to_cpu():
    m = nn.Linear(2, 2)
    p = SaddlePoint.from_model(m, eigenvalues=torch.tensor([-1., 1.]), loss=torch.tensor(0.25))
    with torch.no_grad(): m.weight.zero_()
    assert not torch.equal(p.params['weight'], m.weight.detach())
    assert p.params['weight'].device.type == 'cpu'
    assert p.eigenvalues == [-1., 1.] and isinstance(p.loss, float) and p.loss == 0.25
    with pytest.raises(TypeError, match='non-empty dict'): SaddlePoint({})
    with pytest.raises(TypeError, match="params\\['w'\\]"): SaddlePoint({'w': [1., 2.]})


def test_select_and_target(bank):
    fct.test_eq([p.step for p in bank.select(2)], [200, 400])  # tie at 0.2 keeps capture order
    fct.test_eq([p.step for p in bank.select(3)], [200, 400, 300])
    fct.test_eq(len(bank.select(99)), 4)
    t = bank.target(3)
    sel = bank.select(3)
    for n in t:
        ref = (sel[0].params[n].double() + sel[1].params[n].double() + sel[2].params[n].double()) / 3
        assert t[n].dtype == torch.float32
        assert torch.equal(t[n], ref.float())
    assert all(torch.equal(bank.target(1)[n], bank[1].params[n]) for n in t)  # the mean of one point is the point
    with pytest.raises(ValueError, match='positive integer'): bank.select(0)
    with pytest.raises(SaddleBankError, match='empty'): SaddleBank().target(5)
    # NaN losses sort last
    b = SaddleBank([_point(1, float('nan')), _point(2, 3.)])
    fct.test_eq(b.select(1)[0].step, 200)


def test_append_refuses_other_architecture(bank):
    with pytest.raises(SaddleBankError, match="conv1.weight"): bank.append(_point(5, 0.1, model=DigitsCNN(8)))
    with pytest.raises(TypeError): bank.append({'w': torch.zeros(1)})
    both = bank + SaddleBank([_point(9, 0.01)])
    fct.test_eq(len(both), 5)
    fct.test_eq(both.select(1)[0].step, 900)


def test_save_load_round_trip(bank, tmp_path):
    pt = _point(6, float('nan'))
    pt.params = {n: t.double() if n.startswith('fc') else t for n, t in pt.params.items()}  # mixed dtypes survive
    b = SaddleBank([pt])
    for bk, name in ((bank, 'b1'), (b, 'b2'), (SaddleBank(), 'empty')):
        path = bk.save(tmp_path/name)
        _assert_same(bk, SaddleBank.load(path))
        _assert_same(bk, SaddleBank.load(path/'manifest.json'))
    m = json.loads((tmp_path/'b1'/'manifest.json').read_text())
    fct.test_eq((m['format'], m['version'], m['num_points']), ('fastsprkd.SaddleBank', 1, 4))
    fct.test_eq(m['fingerprint'][0], ['conv1.weight', [4, 1, 3, 3], 'float32'])


def test_load_never_unpickles(bank, tmp_path, monkeypatch):
    bank.save(tmp_path/'b')
    def boom(*a, **k): raise AssertionError('unpickling')
    for mod, name in ((pickle, 'load'), (pickle, 'loads'), (torch, 'load')): monkeypatch.setattr(mod, name, boom)
    _assert_same(bank, SaddleBank.load(tmp_path/'b'))


def test_overwrite_is_atomic(bank, tmp_path, monkeypatch):
    path = tmp_path/'b'
    bank.save(path)
    small = SaddleBank([bank[0]])
    real = os.replace
    def crash(src, dst):
        if str(dst).endswith('manifest.json'): raise OSError('power cut')
        return real(src, dst)
    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(OSError, match='power cut'): small.save(path)
    monkeypatch.setattr(os, 'replace', real)
    _assert_same(bank, SaddleBank.load(path))  # the old bank is intact
    assert not [f for f in os.listdir(path) if f.endswith('.tmp')]  # no temporary file left behind
    small.save(path)
    _assert_same(small, SaddleBank.load(path))
    fct.test_eq(len(list(path.glob('*.safetensors'))), 1)  # the stale tensor file is removed


def test_load_errors(bank, tmp_path):
    with pytest.raises(FileNotFoundError, match='no saddle bank'): SaddleBank.load(tmp_path/'missing')
    (tmp_path/'afile').write_text('x')
    with pytest.raises(SaddleBankError, match='is a file'): SaddleBank.load(tmp_path/'afile')
    with pytest.raises(FileExistsError, match='directory'): bank.save(tmp_path/'afile')
    (tmp_path/'emptydir').mkdir()
    with pytest.raises(FileNotFoundError, match='manifest.json is missing'): SaddleBank.load(tmp_path/'emptydir')

    path = bank.save(tmp_path/'b')
    tf = next(path.glob('*.safetensors'))
    good = tf.read_bytes()
    tf.write_bytes(good[:len(good) // 2])  # truncated
    with pytest.raises(SaddleBankError, match=r'is [\d,]+ bytes, the manifest says [\d,]+: the file was truncated'):
        SaddleBank.load(path)  # refused from its size, before it is read
    edited = bytearray(good); edited[-5] ^= 0xFF  # one byte of tensor data changed, same length
    tf.write_bytes(bytes(edited))
    with pytest.raises(SaddleBankError, match='checksum mismatch'): SaddleBank.load(path)
    tf.write_bytes(good)
    SaddleBank.load(path)

    mf = path/'manifest.json'
    mgood = mf.read_text()
    mf.write_text(mgood[:len(mgood) // 2])
    with pytest.raises(SaddleBankError, match='not valid JSON'): SaddleBank.load(path)
    m = json.loads(mgood)
    for key, val, msg in (('version', 2, 'version 2.*upgrade'), ('format', 'other', 'not a saddle bank manifest'),
                          ('sha256', '0' * 64, 'checksum mismatch')):
        mf.write_text(json.dumps({**m, key: val}))
        with pytest.raises(SaddleBankError, match=msg): SaddleBank.load(path)
    # a corrupt tensor file whose checksum was also edited: the safetensors header check catches it
    junk = b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": broken json'
    import hashlib
    tf.write_bytes(junk)
    mf.write_text(json.dumps({**m, 'sha256': hashlib.sha256(junk).hexdigest(), 'tensor_size': len(junk)}))
    with pytest.raises(SaddleBankError, match='not a valid safetensors'): SaddleBank.load(path)
    mf.write_text(json.dumps({k: v for k, v in m.items() if k != 'points'}))
    with pytest.raises(SaddleBankError, match='edited'): SaddleBank.load(path)
    mf.write_text(mgood); tf.unlink()
    with pytest.raises(FileNotFoundError, match='incomplete'): SaddleBank.load(path)


def test_load_checks_point_field_types(bank, tmp_path):
    "A manifest whose point fields were edited into the wrong JSON types raises SaddleBankError, never loads garbage."
    path = bank.save(tmp_path/'b')
    mf = path/'manifest.json'
    m = json.loads(mf.read_text())
    for key, val in (('loss', 'abc'), ('eigenvalues', '12'), ('eigenvalues', ['x']), ('step', '7a'), ('step', 1.5),
                     ('epoch', True), ('meta', 'ab'), ('grad_norm', [1.])):
        pts = [dict(m['points'][0], **{key: val})] + m['points'][1:]
        mf.write_text(json.dumps({**m, 'points': pts}))
        with pytest.raises(SaddleBankError, match=f'point 0 .* is malformed'): SaddleBank.load(path)
    mf.write_text(json.dumps({**m, 'points': [5] + m['points'][1:]}))
    with pytest.raises(SaddleBankError, match='malformed'): SaddleBank.load(path)
    with pytest.raises(TypeError, match='string'): SaddlePoint({'w': torch.zeros(2)}, eigenvalues='12')


def test_saved_files_are_standard_json_with_plain_permissions(tmp_path):
    "NaN losses are written as null (strict JSON parsers reject NaN) and read back as NaN; files get the umask's mode."
    b = SaddleBank([_point(1, float('nan'))])
    path = b.save(tmp_path/'b')
    def refuse(tok): raise AssertionError(f"non-standard JSON token {tok}")
    m = json.loads((path/'manifest.json').read_text(), parse_constant=refuse)
    assert m['points'][0]['loss'] is None
    assert math.isnan(SaddleBank.load(path)[0].loss)
    umask = os.umask(0); os.umask(umask)
    for f in path.iterdir(): fct.test_eq(f.stat().st_mode & 0o777, 0o666 & ~umask)


def test_meta_must_be_json(tmp_path):
    b = SaddleBank([_point(1, 0.1, meta={'f': object()})])
    with pytest.raises(TypeError, match='JSON-serializable'): b.save(tmp_path/'b')


def test_compatibility_and_crop_injection():
    torch.manual_seed(0)
    teacher = DigitsCNN(32)
    bank = SaddleBank([SaddlePoint.from_model(teacher, loss=0.1)])
    fct.test_eq(bank.check_compatible(DigitsCNN(32)), 'exact')
    student = DigitsCNN(16)
    fct.test_eq(bank.check_compatible(student), 'crop')
    inject(student, bank.target(1))
    tp = dict(teacher.named_parameters())
    for n, p in student.named_parameters():
        if n == 'fc.weight': continue  # reads the flattened conv2 output: channel-aligned, below
        T, S = tp[n].shape, p.shape
        idx = tuple(slice((t - s) // 2, (t - s) // 2 + s) for t, s in zip(T, S))
        assert torch.equal(p.detach(), tp[n].detach()[idx]), n
    # explicit values: conv1.weight 32×1×3×3 → 16×1×3×3 starts at 8; fc.weight 10×(64 channels × 4 positions) keeps
    # channels 16..47 (those conv2 keeps), every position
    assert torch.equal(student.conv1.weight, teacher.conv1.weight[8:24])
    assert torch.equal(student.fc.weight, teacher.fc.weight.view(10, 64, 4)[:, 16:48].reshape(10, 128))
    assert torch.equal(student.conv2.bias, teacher.conv2.bias[16:48])
    cropped = crop_params(bank.target(1), student)
    assert all(torch.equal(cropped[n], p.detach()) for n, p in student.named_parameters())
    with pytest.warns(UserWarning, match="dict of shapes"):  # no model to trace: plain centre crop, with a warning
        cropped = crop_params(bank.target(1), {n: p.shape for n, p in student.named_parameters()})
    assert torch.equal(cropped['fc.weight'], teacher.fc.weight.detach()[:, 64:192])
    # same size: an exact copy, also into float64
    same = inject(DigitsCNN(32).double(), bank.target(1))
    assert all(torch.equal(p.detach(), tp[n].detach().double()) for n, p in same.named_parameters())

    with pytest.raises(SaddleBankError, match="'conv1.weight'.*larger"): bank.check_compatible(DigitsCNN(64))
    with pytest.raises(SaddleBankError, match="missing from the bank: \\['1.weight'.*not in the model: \\['conv1.weight'"): bank.check_compatible(DigitsMLP())
    with pytest.raises(SaddleBankError, match='missing from the bank'): inject(DigitsMLP(), bank.target(1))
    class Flat(DigitsCNN):
        def __init__(self):
            super().__init__(16)
            self.fc.weight = nn.Parameter(torch.zeros(10 * 128))
    with pytest.raises(SaddleBankError, match="'fc.weight'.*rank"): bank.check_compatible(Flat())
    with pytest.raises(SaddleBankError, match='empty'): SaddleBank().check_compatible(student)


def test_centre_crop_odd_difference():
    t = torch.arange(7.)
    fct.test_eq(centre_crop(t, (4,)), torch.tensor([1., 2., 3., 4.]))
    fct.test_eq(centre_crop(t, (7,)), t)
    fct.test_eq(centre_crop(t, (0,)).shape, (0,))



def test_nan_in_meta_is_saved_as_null(tmp_path):
    b = SaddleBank([_point(1, 0.1, meta={'valid_loss': float('nan'), 'note': 'x'})])
    fct.test_eq(SaddleBank.load(b.save(tmp_path/'b'))[0].meta, {'valid_loss': None, 'note': 'x'})


# ---- hostile and careless bank folders (issue 19) ----
def _small_bank(v=1., n=1):
    return SaddleBank([SaddlePoint({'w': torch.full((3, 4), v + i), 'b': torch.full((3,), -v - i)}, loss=v + i, step=i, grad_norm=0.5,
                                   meta={'v': v}) for i in range(n)])


def _manifest(path): return json.loads((path/'manifest.json').read_text())


def _write_manifest(path, m): (path/'manifest.json').write_text(json.dumps(m))


def test_load_reads_only_files_inside_the_bank_folder(tmp_path):
    bank = _small_bank()
    path = bank.save(tmp_path/'b')
    m = _manifest(path)
    tf = path/m['tensor_file']
    (tmp_path/'outside.safetensors').write_bytes(tf.read_bytes())  # a valid tensor file one level up
    for name in ('../outside.safetensors', str(tmp_path/'outside.safetensors'), 'sub/x.safetensors', '..', '', 'C:x', 5, None):
        _write_manifest(path, {**m, 'tensor_file': name})
        with pytest.raises(SaddleBankError, match=r"names the tensor file .* not a plain file name"): SaddleBank.load(path)
    _write_manifest(path, m)
    tf.unlink(); tf.symlink_to(tmp_path/'outside.safetensors')  # an outward symlink: not followed
    with pytest.raises(SaddleBankError, match=r"symbolic link to .*outside\.safetensors, outside the bank folder"):
        SaddleBank.load(path)
    tf.unlink(); (path/'copy.bin').write_bytes((tmp_path/'outside.safetensors').read_bytes())
    tf.symlink_to('copy.bin')  # a symlink that stays inside the folder is read
    _assert_same(bank, SaddleBank.load(path))
    mf = path/'manifest.json'
    (tmp_path/'m.json').write_text(mf.read_text()); mf.unlink(); mf.symlink_to(tmp_path/'m.json')
    with pytest.raises(SaddleBankError, match=r"manifest\.json is a symbolic link .* outside the bank folder"): SaddleBank.load(path)


def test_load_refuses_devices_fifos_and_oversized_files_without_reading_them(tmp_path, monkeypatch):
    import re, threading, time
    bank = _small_bank()
    path = bank.save(tmp_path/'b')
    m = _manifest(path)
    tf = path/m['tensor_file']
    good = tf.read_bytes()
    read = []
    real_read = os.read
    def counting_read(fd, n):
        b = real_read(fd, n); read.append(len(b)); return b
    monkeypatch.setattr(os, 'read', counting_read)

    def load_within(seconds, match):
        "SaddleBank.load(path) must raise a SaddleBankError matching `match` within `seconds` (run in a thread: a FIFO would block)."
        box = []
        def go():
            try: SaddleBank.load(path)
            except BaseException as e: box.append(e)
        t0 = time.perf_counter()
        th = threading.Thread(target=go, daemon=True); th.start(); th.join(seconds)
        assert not th.is_alive(), f"load blocked for more than {seconds} s"
        assert time.perf_counter() - t0 < seconds and box and isinstance(box[0], SaddleBankError), box
        assert re.search(match, str(box[0])), str(box[0])
    tf.unlink(); tf.symlink_to('/dev/zero')
    load_within(1, r"symbolic link to /dev/zero, outside the bank folder")
    _write_manifest(path, {**m, 'tensor_file': '/dev/zero'})
    load_within(1, r"not a plain file name")
    _write_manifest(path, m)
    tf.unlink(); os.mkfifo(tf)
    try: load_within(1, r"is a FIFO \(named pipe\), not a regular file")
    finally: tf.unlink()
    tf.write_bytes(good); os.truncate(tf, 64 * 2**30)  # a sparse 64 GiB file
    del read[:]
    load_within(1, r"is 68,719,476,736 bytes, the manifest says [\d,]+")
    assert sum(read) <= len((path/'manifest.json').read_bytes()) + 1, "the oversized tensor file was read"
    _write_manifest(path, {k: v for k, v in m.items() if k != 'tensor_size'})  # a bank saved before tensor_size existed
    del read[:]
    load_within(1, r"is 68,719,476,736 bytes, the manifest says [\d,]+")  # the size comes from the safetensors header
    assert sum(read) < 4096 + len((path/'manifest.json').read_bytes())
    tf.write_bytes(good)
    _assert_same(bank, SaddleBank.load(path))  # without tensor_size, a good file still loads
    mf = path/'manifest.json'
    mf.write_bytes(b' '); os.truncate(mf, 2**36)  # a 64 GiB manifest
    del read[:]
    load_within(1, r"manifest\.json is 68,719,476,736 bytes, more than the [\d,]+ a saddle bank's manifest may have")
    assert sum(read) == 0
    mf.unlink(); os.mkfifo(mf)
    try: load_within(1, r"manifest\.json is a FIFO")
    finally: mf.unlink()


def test_deeply_nested_manifests_are_refused(tmp_path):
    from fastsprkd.saddle import MAX_JSON_DEPTH
    bank = _small_bank()
    path = bank.save(tmp_path/'b')
    m = _manifest(path)
    (path/'manifest.json').write_text('[' * 100_000 + ']' * 100_000)
    with pytest.raises(SaddleBankError, match='nested too deeply'): SaddleBank.load(path)
    deep = 0
    for _ in range(100): deep = [deep]
    _write_manifest(path, {**m, 'points': [{**m['points'][0], 'meta': {'x': deep}}]})
    with pytest.raises(SaddleBankError, match=f'nested deeper than {MAX_JSON_DEPTH} levels'): SaddleBank.load(path)
    bank[0].meta = {'x': deep}
    with pytest.raises(TypeError, match='nested deeper'): bank.save(tmp_path/'c')  # save never writes what load refuses
    assert not (tmp_path/'c').exists()


def test_save_removes_the_temporary_files_of_killed_saves(tmp_path):
    import subprocess, sys, time
    path = _small_bank().save(tmp_path/'b')
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    tensor = next(path.glob('*.safetensors')).name
    stale = [f'.manifest.json.{dead.pid}.k2j4_x9a.tmp', f'.{tensor}.{dead.pid}.abcdefgh.tmp', '.manifest.json.zz81lq0_.tmp']
    keep = [f'.manifest.json.{os.getppid()}.live1234.tmp',  # a save running in a live process
            '.manifest.json.recent12.tmp',  # an older fastsprkd's, recent: maybe still being written
            'notes.tmp']  # not a bank save's
    for f in stale + keep: (path/f).write_bytes(b'partial')
    old = time.time() - 2 * 3600
    os.utime(path/stale[2], (old, old))
    _small_bank(2.).save(path)
    left = sorted(f.name for f in path.iterdir())
    fct.test_eq(left, sorted(keep + ['manifest.json', next(path.glob('*.safetensors')).name]))



def test_remove_stale_and_dir_lock(tmp_path):
    "The shared helpers: a dead writer's leftover goes, this process's only once older than `max_age`; a held lock times out."
    import re, subprocess, sys, time
    from fastsprkd.saddle import remove_stale, dir_lock
    dead = subprocess.Popen([sys.executable, '-c', 'pass']); dead.wait()
    pat = re.compile(r'^\.x\.(\d+)\.tmp$')
    for pid in (dead.pid, os.getpid()): (tmp_path/f'.x.{pid}.tmp').write_bytes(b'partial')
    old = time.time() - 2 * 3600
    os.utime(tmp_path/f'.x.{os.getpid()}.tmp', (old, old))
    fct.test_eq(remove_stale(tmp_path, pat, dirs=True), [])  # files, not directories: kept
    fct.test_eq(remove_stale(tmp_path, pat), [tmp_path/f'.x.{dead.pid}.tmp'])  # no age rule: this process's is kept
    fct.test_eq(remove_stale(tmp_path, pat, max_age=3600.), [tmp_path/f'.x.{os.getpid()}.tmp'])
    with dir_lock(tmp_path) as held:
        assert held
        t0 = time.monotonic()
        with dir_lock(tmp_path, timeout=0.2) as other: fct.test_eq(other, False)  # another handle waits, then gives up
        assert 0.2 <= time.monotonic() - t0 < 5
    with dir_lock(tmp_path, timeout=0.2) as again: fct.test_eq(again, True)  # released
    with dir_lock(tmp_path/'missing') as none: fct.test_eq(none, True)  # cannot be taken: the block runs unserialized

_SAVER = r'''
import os, sys, torch
from fastsprkd.saddle import SaddleBank, SaddlePoint
os.fsync = lambda fd: None  # durability is not under test (no crash here), and fsync makes 150 saves slow on a busy disk
print('ready', flush=True)  # imports done: the saves start now
path, n, offset = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
for i in range(n):
    v = offset + i % 7
    SaddleBank([SaddlePoint({'w': torch.full((64, 64), v), 'b': torch.full((64,), -v)}, loss=v, meta={'v': v}) for _ in range(1 + i % 3)]).save(path)
'''


def test_load_racing_saves_returns_a_complete_old_or_new_bank(tmp_path):
    """A process saves a bank 150 times (and a second one 50 times, concurrently) while this one loads it in a loop: every
    load succeeds with one of the saved versions; the concurrent saves leave one consistent bank."""
    import subprocess, sys, time
    path = tmp_path/'b'
    SaddleBank([SaddlePoint({'w': torch.full((64, 64), 0.), 'b': torch.full((64,), -0.)}, loss=0., meta={'v': 0.})]).save(path)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path)}
    savers = [subprocess.Popen([sys.executable, '-c', _SAVER, str(path), str(n), str(off)], env=env, stdout=subprocess.PIPE, text=True)
              for n, off in ((150, 0.), (50, 100.))]
    loads, versions, t0 = 0, set(), time.monotonic()
    try:
        for s in savers: fct.test_eq(s.stdout.readline().strip(), 'ready')  # load while the saves run, not during imports
        while any(s.poll() is None for s in savers):
            assert time.monotonic() - t0 < 120, "the savers did not finish in 120 s"
            b = SaddleBank.load(path)  # never an error
            for p in b:
                v = p.meta['v']
                assert p.loss == v and torch.equal(p.params['w'], torch.full((64, 64), v)) and torch.equal(p.params['b'], torch.full((64,), -v))
            versions.add(p.meta['v']); loads += 1
    finally:
        for s in savers:
            if s.poll() is None: s.kill()
            s.wait()
    fct.test_eq([s.returncode for s in savers], [0, 0])
    assert loads >= 20 and len(versions) >= 2, (loads, versions)
    assert SaddleBank.load(path)[0].meta['v'] in (float(149 % 7), 100. + 49 % 7)  # the last save wins
    fct.test_eq(sorted(f.name.split('-')[0] for f in path.iterdir()), ['manifest.json', 'tensors'])  # no stale file


def _paths(o, prefix=()):
    "Every (path, value) of a JSON document, iteratively."
    out, todo = [], [(prefix, o)]
    while todo:
        p, v = todo.pop()
        out.append(p)
        if isinstance(v, dict): todo.extend((p + (k,), x) for k, x in v.items())
        elif isinstance(v, list): todo.extend((p + (i,), x) for i, x in enumerate(v))
    return sorted(out, key=repr)


def test_fuzzed_banks_load_or_raise_saddle_bank_error(tmp_path):
    "Mutated bytes or JSON fields of a valid bank: `load` returns the saved tensors or raises SaddleBankError, within 5 s each."
    import signal, shutil, tempfile, time
    from datetime import timedelta
    from pathlib import Path
    from hypothesis import given, settings, HealthCheck, strategies as st
    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
               | st.sampled_from(['../x', '/dev/zero', 'manifest.json', '.', '', 'float64', 'int8', 'w', '0/w', 'x' * 300, 'a\x00b']))
    _json = st.recursive(scalars, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=6), ch, max_size=4),
                         max_leaves=8)
    bank = SaddleBank([_point(1, 0.7, model=nn.Linear(3, 2)), _point(2, float('nan'), model=nn.Linear(3, 2), meta={'a': [1, 2]})])
    src = bank.save(tmp_path/'src')
    files = {f.name: f.read_bytes() for f in src.iterdir()}
    tname = next(n for n in files if n.endswith('.safetensors'))
    manifest = json.loads(files['manifest.json'])
    paths = _paths(manifest)

    byte_edit = st.tuples(st.just('bytes'), st.sampled_from(sorted(files)),
                          st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
                          st.none() | st.integers(0, 10**6))
    json_edit = st.tuples(st.just('json'), st.sampled_from(paths), st.sampled_from(['set', 'delete']), _json)

    def timeout(*a): raise _LoadTimeout("SaddleBank.load took more than 5 s")  # not an OSError: load must not turn it into SaddleBankError

    @settings(max_examples=150, deadline=timedelta(seconds=5), database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(byte_edit | json_edit, min_size=1, max_size=3))
    def check(edits):
        d = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            fs, m = dict(files), json.loads(files['manifest.json'])
            for e in edits:
                if e[0] == 'bytes':
                    _, name, subs, cut = e
                    b = bytearray(fs[name])
                    for pos, val in subs:
                        if b: b[pos % len(b)] = val
                    fs[name] = bytes(b if cut is None else b[:cut % (len(b) + 1)])
                    if name == 'manifest.json':
                        try: m = json.loads(fs[name])
                        except Exception: m = None
                elif m is not None:
                    _, path, how, val = e
                    has = lambda o, k: ((isinstance(o, dict) and isinstance(k, str) and k in o)
                                        or (isinstance(o, list) and isinstance(k, int) and k < len(o)))
                    parent = m
                    for k in path[:-1]: parent = parent[k] if has(parent, k) else None
                    if not path: m = val
                    elif has(parent, path[-1]):
                        if how == 'delete': del parent[path[-1]]
                        else: parent[path[-1]] = val
                    fs['manifest.json'] = json.dumps(m).encode()
            for name, b in fs.items(): (d/name).write_bytes(b)
            # a 5 s real-time limit; pytest-timeout's own timer (the same ITIMER_REAL) is restored afterwards
            old, t0 = signal.signal(signal.SIGALRM, timeout), time.monotonic()
            outer = signal.setitimer(signal.ITIMER_REAL, 5)
            try: got = SaddleBank.load(d)
            except SaddleBankError: return
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0); signal.signal(signal.SIGALRM, old)
                if outer[0] > 0: signal.setitimer(signal.ITIMER_REAL, max(outer[0] - (time.monotonic() - t0), 1e-3), outer[1])
            # the tensors are checksummed: whatever loads has the saved ones (scalars and meta are the manifest's, maybe edited)
            assert len(got) == len(bank) and got.fingerprint == bank.fingerprint
            for p, q in zip(bank, got):
                for n in p.params: assert torch.equal(p.params[n], q.params[n])
        finally: shutil.rmtree(d)
    check()


def test_bad_input_tables_in_the_notebooks_are_current():
    "The saddle-bank and core notebooks' bad-input tables are what the code says (regenerate with tests/_bad_inputs.py)."
    from pathlib import Path
    from _bad_inputs import tables
    nbs = Path(__file__).parent.parent/'nbs'
    for table, nb in zip(tables(), ('11_saddle.ipynb', '02_core.ipynb')):
        cells = [''.join(c['source']) for c in json.loads((nbs/nb).read_text())['cells'] if c['cell_type'] == 'markdown']
        assert any(table in c for c in cells), f"the bad-input table of {nb} is out of date: run tests/_bad_inputs.py and paste it"
