import os, warnings
import pytest, torch

os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
torch.set_num_threads(1)  # small models: one thread avoids OpenMP spin-waits on a shared 2-core machine

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA test: no GPU on this machine"))]
