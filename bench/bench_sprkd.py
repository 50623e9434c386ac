"""Overhead of the SPRKD teacher's saddle capture at its defaults on digits teacher training (issue 6).

    .venv/bin/python bench/bench_sprkd.py [--epochs 10] [--repeat 5] [--threads 2]

Teacher: `DigitsCNN(32)` (21,386 parameters) on `digits_dls(bs=64)` (22 training steps an epoch), Adam lr 1e-3, seeded,
`epochs` epochs (10: 220 steps, so tests at steps 100 and 200, the steady-state rate of one test per 100 steps), without
and with `SaddleCaptureCallback()` at its defaults (every=100, k=2, n_probe=128 items in one batch, max_matvecs=16).
The two runs alternate `repeat` times after one warm-up pair. Reported: median wall and CPU (process) time of `fit`
per variant, overhead = median(with) / median(without) − 1, and the median time of one test (`capture()`) alone.
The seeded runs must end with bit-identical parameters (checked): the callback does not change training.
"""
import argparse, statistics, time
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--epochs', type=int, default=10)
    ap.add_argument('--repeat', type=int, default=5)
    ap.add_argument('--threads', type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(min(a.threads, torch.get_num_threads()))
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.torch_core import set_seed
    import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
    from fastsprkd.data import digits_dls
    from fastsprkd.models import DigitsCNN
    from fastsprkd.callback.sprkd import SaddleCaptureCallback

    def run(with_cb):
        set_seed(0)
        dls = digits_dls(bs=64, device='cpu')
        cb = SaddleCaptureCallback() if with_cb else None
        learn = Learner(dls, DigitsCNN(32), loss_func=CrossEntropyLossFlat(), lr=1e-3, cbs=cb)
        w0, c0 = time.perf_counter(), time.process_time()
        with learn.no_bar(), learn.no_logging(): learn.fit(a.epochs)
        return time.perf_counter() - w0, time.process_time() - c0, learn, cb

    run(False); run(True)
    res = {False: [], True: []}
    for _ in range(a.repeat):
        for v in (False, True): res[v].append(run(v))
    (_, _, l0, _), (_, _, l1, cb) = res[False][-1], res[True][-1]
    same = all(torch.equal(p, q) for p, q in zip(l0.model.parameters(), l1.model.parameters()))
    n_tests, n_steps = len(cb.history), cb.n_steps
    for _ in range(3): cb.capture()  # warm-up of the test alone
    ts, cs = [], []
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time(); cb.capture()
        ts.append(time.perf_counter() - t0); cs.append(time.process_time() - c0)
    med = {v: (statistics.median(r[0] for r in res[v]), statistics.median(r[1] for r in res[v])) for v in res}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.epochs} epochs = {n_steps} steps, "
          f"{n_tests} tests per run, {a.repeat} repeats")
    print(f"without: median wall {med[False][0]:.3f} s, cpu {med[False][1]:.3f} s")
    print(f"with:    median wall {med[True][0]:.3f} s, cpu {med[True][1]:.3f} s")
    print(f"overhead: wall {med[True][0] / med[False][0] - 1:+.1%}, cpu {med[True][1] / med[False][1] - 1:+.1%}")
    print(f"one test (16 HVPs on 128 items + loss): median wall {statistics.median(ts) * 1e3:.0f} ms, "
          f"cpu {statistics.median(cs) * 1e3:.0f} ms; training per step (incl. validation): wall "
          f"{med[False][0] / n_steps * 1e3:.1f} ms, cpu {med[False][1] / n_steps * 1e3:.1f} ms")
    print(f"parameters bit-identical with and without the callback: {same}")


if __name__ == '__main__':
    main()
