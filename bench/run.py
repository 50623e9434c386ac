"`make bench`: run every benchmark script in turn (each prints its table and writes bench/results/*.json)."
import subprocess, sys, os

here = os.path.dirname(os.path.abspath(__file__))
scripts = [['bench_core.py', 'hvp'], ['bench_core.py', 'matmat'], ['bench_core.py', 'eigsh'], ['bench_core.py', 'dense'],
           ['bench_estimators.py', 'all'], ['bench_callbacks.py', 'all', '5'], ['bench_sprkd.py', '--repeat', '3'],
           ['bench_resnet.py', 'all']]
rc = 0
for s in scripts:
    print(f"\n=== {' '.join(s)}", flush=True)
    rc |= subprocess.call([sys.executable, os.path.join(here, s[0]), *s[1:]], cwd=here)
sys.exit(rc)
