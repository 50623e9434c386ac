"""Observer overhead at the session-5 defaults (issue 21) on MNIST-1D: plain, observed and old-default fits interleaved (A B C A B C ...), medians.

    nice -n 10 python bench/bench_observer_defaults.py [epochs=20] [repeats=2]

MNIST-1D is generated offline (`mnist1d.data.make_dataset(get_dataset_args())`: 4000 training sequences of length 40),
a 5,210-parameter 1-D CNN, fastai Adam (lr 1e-2, bs 100: 40 steps per epoch), 1 torch thread, num_workers=0.
One untimed 1-epoch observed fit first pays the process's one-time imports (see bench/first_measurement.py).
Prints wall and CPU time per fit, their medians and ratios, and what the observer recorded."""
import sys, time, statistics as st
sys.path.insert(0, 'bench')
import torch
torch.set_num_threads(1)
from mnist1d_common import mnist1d_tensors, mnist1d_learner
from fastsprkd.callback.observe import HessianSpectrumCallback

OLD = dict(trace_matvecs=12, trace_rtol=None, lambda_min_rtol=None, precond=False)  # the defaults before issue 21

def fit(data, epochs, observed):
    learn = mnist1d_learner(data)
    cb = (HessianSpectrumCallback(**OLD) if observed == 'old' else HessianSpectrumCallback()) if observed else None
    w, c = time.perf_counter(), time.process_time()
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, cbs=[cb] if cb else None)
    return time.perf_counter() - w, time.process_time() - c, cb

if __name__ == '__main__':
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    data = mnist1d_tensors()
    fit(data, 1, True)  # warm-up: imports, allocator
    res = {False: [], True: [], 'old': []}
    for i in range(repeats):
        for observed in (False, True, 'old'):
            wall, cpu, cb = fit(data, epochs, observed)
            res[observed].append((wall, cpu))
            print(f"run {i} {dict([(False, 'plain'), (True, 'observed'), ('old', 'old defaults')])[observed]}: wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
            if cb is not None:
                h = cb.history
                rel = [r['trace_stderr'] / abs(r['trace']) for r in h]
                if observed == 'old':
                    print(f"   {len(h)} measurements at steps {[r['step'] for r in h]}; products {[r['num_matvecs'] for r in h]}; trace stderr/|trace| "
                          f"{[round(x, 3) for x in rel]}", flush=True)
                    continue
                print(f"   {len(h)} measurements at steps {[r['step'] for r in h]}; products {[r['num_matvecs'] for r in h]}; "
                      f"seconds {[round(r['seconds'], 2) for r in h]}", flush=True)
                print(f"   trace stderr/|trace|: median {st.median(rel):.3f}, max {max(rel):.3f}, ≤ 5% in {sum(x <= 0.05 for x in rel)}/{len(rel)}; "
                      f"λ_min within 5% (residual bound) in {sum(bool(r['lambda_min_converged']) for r in h)}/{len(h)}", flush=True)
                print(f"   last: λ_max {h[-1]['lambda_max']:.3g} ± {h[-1]['lambda_max_err']:.1g}, λ_min {h[-1]['lambda_min']:.3g} ± {h[-1]['lambda_min_err']:.1g}, "
                      f"trace {h[-1]['trace']:.4g} ± {h[-1]['trace_stderr']:.2g}, λ_max(D⁻¹H) {h[-1]['precond_sharpness']:.4g} vs 38/lr = {h[-1]['precond_threshold']:.4g}", flush=True)
    for k, name in ((0, 'wall'), (1, 'CPU')):
        a, b, o = (st.median(r[k] for r in res[x]) for x in (False, True, 'old'))
        print(f"median {name}: plain {a:.1f} s, observed {b:.1f} s (ratio {b / a:.3f}), old defaults {o:.1f} s (ratio {o / a:.3f})")
