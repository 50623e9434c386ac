"""The observer's first measurement in a process vs the later ones (issue 21), on MNIST-1D and a small 1-D CNN.

    python bench/first_measurement.py [preload]   # 'preload': import torch._dynamo before the fit (the observer itself now calls fastsprkd.stability.preload_torch_func before each measurement's clock)

Prints the seconds of each measurement, the reverse-over-reverse path the operator chose ('vmap' or 'loop'), and the number of
modules imported during the fit."""
import sys, time
sys.path.insert(0, 'bench')
from mnist1d_common import mnist1d_tensors, mnist1d_learner
from fastai.callback.core import Callback
from fastsprkd.callback.observe import HessianSpectrumCallback

class Spy(Callback):
    order = HessianSpectrumCallback.order + 1
    def after_step(self):
        op = self.learn.hessian_spectrum._op
        if op is not None: self.rev = op._rev_many

if __name__ == '__main__':
    data = mnist1d_tensors()
    learn = mnist1d_learner(data)
    if 'preload' in sys.argv[1:]:
        t = time.perf_counter(); import torch._dynamo; print(f'import torch._dynamo: {time.perf_counter() - t:.2f} s')
    before = set(sys.modules)
    cb, spy = HessianSpectrumCallback(every=20, budget=None), Spy()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[cb, spy])
    print('modules imported during the fit:', len(set(sys.modules) - before), '| torch._dynamo among them:', 'torch._dynamo' in set(sys.modules) - before)
    print('rev path chosen:', getattr(spy, 'rev', None))
    print('measurements (step, seconds, products):', [(r['step'], round(r['seconds'], 2), r['num_matvecs']) for r in cb.history])
