"Saddle bank: selection, averaging, storage (round trip, atomicity, corruption), centre-crop injection."
import json, math, os, pickle
import pytest, torch
from torch import nn
import fastcore.test as fct
from fastsprkd.saddle import SaddlePoint, SaddleBank, SaddleBankError, centre_crop, crop_params, inject
from fastsprkd.models import DigitsCNN, DigitsMLP


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
    with pytest.raises(SaddleBankError, match='checksum mismatch.*truncated or edited'): SaddleBank.load(path)
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
    mf.write_text(json.dumps({**m, 'sha256': hashlib.sha256(junk).hexdigest()}))
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
