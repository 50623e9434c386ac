"""The bad-input tables of the saddle-bank and core notebooks, generated from the real code (messages as raised, temporary
paths replaced by placeholders). `python tests/_bad_inputs.py` prints them; tests/test_saddle.py checks the notebooks hold them."""
import json, os, tempfile, math
from pathlib import Path
import torch
from torch import nn
from fastsprkd.saddle import SaddleBank, SaddlePoint, SaddleBankError
from fastsprkd.core import HessianOperator, preserved_state, DenseOperator

def msg(f):
    try: f()
    except BaseException as e: return type(e).__name__, str(e)
    return None, 'accepted'

def row(inp, r, sub):
    t, m = r
    if t == '_MissingFileError': t = 'SaddleBankError`, also `FileNotFoundError'  # the class raised for a missing file
    for a, b in sub: m = m.replace(a, b)
    m = m.replace('|', '\\|').replace('\n', ' ')
    return f"| {inp} | `{t}` | {m} |"

def tables() -> tuple:
    "(saddle-bank table, core table) as markdown."
    rows = []
    tmp = Path(tempfile.mkdtemp())
    bank = SaddleBank([SaddlePoint({'w': torch.zeros(3, 4), 'b': torch.zeros(3)}, loss=0.5)])
    path = bank.save(tmp/'bank')
    m = json.loads((path/'manifest.json').read_text())
    tf = path/m['tensor_file']
    good = tf.read_bytes()
    sub = [(str(tmp/'bank'), 'BANK'), (str(tmp), 'DIR'), (m['tensor_file'], 'tensors-HASH.safetensors')]
    def wm(mm): (path/'manifest.json').write_text(json.dumps(mm))
    def case(inp, setup, undo=None):
        setup(); rows.append(row(inp, msg(lambda: SaddleBank.load(path)), sub))
        wm(m); 
        if tf.is_symlink() or not tf.exists() or not tf.is_file():
            if tf.exists() or tf.is_symlink(): tf.unlink()
            tf.write_bytes(good)
        else: tf.write_bytes(good)
    case("`tensor_file` is `../x.safetensors`", lambda: wm({**m, 'tensor_file': '../x.safetensors'}))
    case("`tensor_file` is an absolute path (`/dev/zero`)", lambda: wm({**m, 'tensor_file': '/dev/zero'}))
    def outward(): (tmp/'outside.safetensors').write_bytes(good); tf.unlink(); tf.symlink_to(tmp/'outside.safetensors')
    case("the tensor file is a symlink to a file outside the folder", outward)
    def fifo(): tf.unlink(); os.mkfifo(tf)
    case("the tensor file is a FIFO", fifo)
    def sparse(): os.truncate(tf, 64 * 2**30)
    case("the tensor file is a 64 GiB sparse file", sparse)
    def trunc(): tf.write_bytes(good[:len(good) // 2])
    case("the tensor file is truncated", trunc)
    def flip(): b = bytearray(good); b[-3] ^= 0xFF; tf.write_bytes(bytes(b))
    case("one byte of the tensor file is changed", flip)
    case("the tensor file is missing", lambda: tf.unlink())
    def deep(): (path/'manifest.json').write_text('[' * 100_000 + ']' * 100_000)
    case("the manifest is nested 100,000 levels deep", deep)
    case("the manifest is nested 100 levels deep (in a point's `meta`)",
         lambda: wm({**m, 'points': [{**m['points'][0], 'meta': json.loads('{"x": ' + '[' * 100 + ']' * 100 + '}')}]}))
    def big(): (path/'manifest.json').write_bytes(b' '); os.truncate(path/'manifest.json', 2**30)
    case("the manifest is 1 GiB", big)
    case("the manifest is not JSON", lambda: (path/'manifest.json').write_text('{"format": '))
    case("the manifest has `version: 2`", lambda: wm({**m, 'version': 2}))
    case("a point's `step` is `1.5`", lambda: wm({**m, 'points': [{**m['points'][0], 'step': 1.5}]}))
    case("`tensor_size` is `-1`", lambda: wm({**m, 'tensor_size': -1}))
    deepmeta = SaddleBank([SaddlePoint({'w': torch.zeros(2)}, meta={'x': json.loads('[' * 80 + ']' * 80)})])
    rows.append(row("`save` of a point whose `meta` is nested 80 levels deep", msg(lambda: deepmeta.save(tmp/'deep')), sub))
    rows.append(row("`load` of a folder without `manifest.json`", msg(lambda: (tmp/'empty').mkdir() or SaddleBank.load(tmp/'empty')), sub))
    saddle_table = "| input | error | message |\n|---|---|---|\n" + '\n'.join(rows)

    # core
    rows = []
    m64 = nn.Sequential(nn.Linear(3, 2)).double()
    x32, y = torch.randn(4, 3), torch.randn(4, 2)
    x64 = x32.double()
    L = nn.MSELoss()
    rows.append(row("float64 model, float32 inputs", msg(lambda: HessianOperator(m64, L, (x32, y))), []))
    rows.append(row("the same with `validate=False` (at the first product)",
                    msg(lambda: HessianOperator(m64, L, (x32, y), validate=False).matvec(torch.zeros(8, dtype=torch.float64))), []))
    rows.append(row("`data=[]`", msg(lambda: HessianOperator(m64, L, [])), []))
    rows.append(row("`data` is a tensor, not `(x, y)`", msg(lambda: HessianOperator(m64, L, x64)), []))
    rows.append(row("a loss that returns one value per sample", msg(lambda: HessianOperator(m64, nn.MSELoss(reduction='none'), (x64, y.double()))), []))
    rows.append(row("a loss that is NaN", msg(lambda: HessianOperator(m64, lambda p, t: (p * math.nan).mean(), (x64, y.double()))), []))
    rows.append(row("`params='nope'`", msg(lambda: HessianOperator(m64, L, (x64, y.double()), params='nope')), []))
    rows.append(row("`mode='forward'`", msg(lambda: HessianOperator(m64, L, (x64, y.double()), mode='forward')), []))
    op = HessianOperator(m64, L, (x64, y.double()))
    rows.append(row("`op.matvec(v)` with a float32 `v`", msg(lambda: op.matvec(torch.zeros(8))), []))
    rows.append(row("`op.matvec(v)` with 7 entries (the operator has 8)", msg(lambda: op.matvec(torch.zeros(7, dtype=torch.float64))), []))
    rows.append(row("`op.to_dense(max_bytes=100)`", msg(lambda: op.to_dense(max_bytes=100)), []))
    rows.append(row("`DenseOperator` of a non-symmetric matrix", msg(lambda: DenseOperator(torch.tensor([[1., 2.], [0., 1.]]))), []))
    rows.append(row("`preserved_state(model, values='all')`", msg(lambda: preserved_state(m64, values='all').__enter__()), []))
    core_table = "| input | error | message |\n|---|---|---|\n" + '\n'.join(rows)
    import shutil; shutil.rmtree(tmp)
    return saddle_table, core_table


if __name__ == '__main__':
    for t in tables(): print(t, end='\n\n')
