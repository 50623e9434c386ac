"Shared helpers of the benchmarks: timing by medians, the benchmark models and data, machine description."
import os, platform, statistics, time, json
import torch
from torch import nn


def median_time(fn, repeat=5, warmup=1):
    "Median wall time of `fn()` in seconds over `repeat` runs after `warmup` runs."
    for _ in range(warmup): fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def machine():
    return dict(python=platform.python_version(), torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), cores=os.cpu_count(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def digits_tensors(n=None, side=8):
    "The bundled digits as tensors (upsampled to `side`×`side` for the MNIST-sized networks; no MNIST download)."
    from fastsprkd.data import digits_tensors
    x, y = digits_tensors()
    if n is not None: x, y = x[:n], y[:n]
    if side != 8: x = nn.functional.interpolate(x, size=(side, side), mode='bilinear', align_corners=False)
    return x, y


def bench_models():
    "(name, model, x, y, loss) of the benchmark networks: SPEC §1-B seed CNN, and a digits CNN and MLP."
    from fastsprkd.models import SeedCNN, DigitsCNN, DigitsMLP
    torch.manual_seed(0)
    x28, y28 = digits_tensors(1500, 28)
    x8, y8 = digits_tensors(512)
    return [('seed CNN (1,710 params, 1,500 imgs 28x28)', SeedCNN(), x28, y28, nn.NLLLoss()),
            ('digits CNN (21,386 params, 512 imgs)', __import__('fastsprkd.models', fromlist=['DigitsCNN']).DigitsCNN(32), x8, y8, nn.CrossEntropyLoss()),
            ('digits MLP (17,226 params, 512 imgs)', DigitsMLP((128, 64)), x8, y8, nn.CrossEntropyLoss())]


def save(name, rows):
    os.makedirs(os.path.join(os.path.dirname(__file__), 'results'), exist_ok=True)
    p = os.path.join(os.path.dirname(__file__), 'results', f'{name}.json')
    with open(p + '.tmp', 'w') as f: json.dump(dict(machine=machine(), rows=rows), f, indent=1)
    os.replace(p + '.tmp', p)
    return p


def table(rows, cols):
    out = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for r in rows: out.append('| ' + ' | '.join(str(r.get(c, '')) for c in cols) + ' |')
    return '\n'.join(out)


def kronfluence_ce_task():
    """kronfluence's `Task` for a classifier trained with summed cross-entropy: the training loss (with labels sampled from
    the model for its Fisher when `sample=True`) and the measurement, the test item's loss. One definition for every
    benchmark that runs kronfluence as the peer."""
    from kronfluence.task import Task
    class CrossEntropyTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            xb, yb = batch
            logits = model(xb)
            if sample:
                with torch.no_grad(): yb = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return nn.functional.cross_entropy(logits, yb, reduction='sum')
        def compute_measurement(self, batch, model): return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction='sum')
    return CrossEntropyTask()
