"Output directories: leftovers of killed runs are removed by the next run; full disks and concurrent publishers give one line."
import errno, os, subprocess, sys, threading
from pathlib import Path
import pytest
import fastcore.test as fct
from fastsprkd import experiment as ex
from fastsprkd.experiment import atomic_output_dir, remove_stale_outputs, OutputDirError, MARKER
from fastsprkd.cli import main


def _dead_pid():
    "The PID of a process that has exited."
    p = subprocess.Popen([sys.executable, '-c', 'pass']); p.wait()
    return p.pid


@pytest.mark.skipif(not hasattr(os, 'fork'), reason="needs os.fork to leave a killed run's directory")
def test_killed_run_leftovers_are_removed(tmp_path):
    out = tmp_path/'out'
    with atomic_output_dir(out) as t: (t/'report.md').write_text('first')
    dead = _dead_pid()
    # what `kill -9` leaves: a killed run's temporary directory and, killed mid-swap, a previous report moved aside
    stale = [tmp_path/f'.out.{dead}-k1l2d.tmp', tmp_path/f'.out.old-{dead}', tmp_path/f'.out.old-{dead}-0a1b2c3d']
    live = tmp_path/f'.out.{os.getpid()}-live1.tmp'  # a run still in progress (this process): kept
    other = tmp_path/f'.other.{dead}-x.tmp'  # another target's: kept
    for d in stale + [live, other]: d.mkdir(); (d/'report.md').write_text('partial')
    # a killed child (forked: the modules are loaded) really leaves its temporary directory behind
    pid = os.fork()
    if pid == 0:
        try:
            with atomic_output_dir(out) as t: (t/'x').write_text('1'); os._exit(9)
        finally: os._exit(1)
    _, status = os.waitpid(pid, 0)
    fct.test_eq(os.waitstatus_to_exitcode(status), 9)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(f'.out.{pid}-')]
    assert len(left) == 1, sorted(p.name for p in tmp_path.iterdir())
    with atomic_output_dir(out) as t: (t/'report.md').write_text('second')
    fct.test_eq(sorted(p.name for p in tmp_path.iterdir()), sorted(['out', live.name, other.name]))
    fct.test_eq((out/'report.md').read_text(), 'second')
    fct.test_eq(remove_stale_outputs(out), [])


@pytest.mark.parametrize('err,what', [(errno.ENOSPC, 'no space left on the device'),
                                      (errno.EFBIG, 'file-size limit')])
def test_full_disk_is_one_line(tmp_path, monkeypatch, capsys, err, what):
    out = tmp_path/'demo'
    with atomic_output_dir(out) as t: (t/'report.md').write_text('previous')
    def full(story, d, *a, **k): raise OSError(err, os.strerror(err), str(Path(d)/'metrics.json'))
    monkeypatch.setattr(ex, 'write_demo_report', full)
    monkeypatch.setattr(ex, 'run_story', lambda *a, **k: None)
    code = main(['demo', '--out', str(out), '--epochs', '1'])
    _, stderr = capsys.readouterr()
    fct.test_eq(code, 1)
    lines = [l for l in stderr.strip().splitlines() if 'error' in l]  # the others are the stage log
    fct.test_eq(len(lines), 1)
    assert 'Traceback' not in stderr
    assert what in lines[0] and str(out/'metrics.json') in lines[0] and f'the previous report in {out} is intact' in lines[0], lines
    fct.test_eq((out/'report.md').read_text(), 'previous')
    fct.test_eq(sorted(p.name for p in tmp_path.iterdir()), ['demo'])
    with pytest.raises(OutputDirError, match='nothing was written'):
        with atomic_output_dir(tmp_path/'new'): raise OSError(errno.ENOSPC, 'No space left on device')
    fct.test_eq(sorted(p.name for p in tmp_path.iterdir()), ['demo'])


def test_concurrent_publishers(tmp_path):
    "Eight runs publish the same target at once: each succeeds or fails with an OutputDirError; one complete report remains."
    out = tmp_path/'out'
    with atomic_output_dir(out) as t: (t/'report.md').write_text('previous')
    barrier, errors, done = threading.Barrier(8), [], []
    def run(i):
        try:
            with atomic_output_dir(out) as t:
                (t/'report.md').write_text(f'run {i}')
                barrier.wait()
            done.append(i)
        except OutputDirError as e: errors.append(str(e))
        except BaseException as e: errors.append(f'RAW {type(e).__name__}: {e}')
    ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in ts: t.start()
    for t in ts: t.join(60)
    assert not [e for e in errors if e.startswith('RAW')], errors
    assert all('\n' not in e for e in errors)
    fct.test_eq(sorted(p.name for p in tmp_path.iterdir()), ['out'])
    fct.test_eq(sorted(p.name for p in out.iterdir()), [MARKER, 'report.md'])
    assert (out/'report.md').read_text() in {f'run {i}' for i in done}
