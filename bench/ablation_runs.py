"""The ablation of `fastsprkd experiment --arms all --budgets B1,B2`, one (budget, seed) story per JSON file, so that a long
run can be split over processes and whatever finished can be reported (`bench/ablation_report.py` merges the files).

    nice -n 10 python bench/ablation_runs.py mnist1d 5,15 0,2,4 runs/mnist1d
"""
import json, sys, time
from pathlib import Path
from fastsprkd.experiment import StoryConfig, ARMS, run_story
from fastsprkd.experiment.report import strict_json_dumps

def main(dataset, budgets, seeds, out):
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    for s in [int(x) for x in seeds.split(',')]:
        for B in [int(x) for x in budgets.split(',')]:
            f = out/f'run_{B}_{s}.json'
            if f.exists(): continue
            t0 = time.perf_counter()
            story = run_story(StoryConfig(dataset=dataset, epochs=B, arms=ARMS), s, progress=False, spectrum=False)
            r = dict(seed=s, epochs=B, metrics=story.metrics, saddle_capture=story.saddle_summary(), probe_items=story.probe_items,
                     describe=story.describe(), wall_seconds=time.perf_counter() - t0)
            f.with_suffix('.part').write_text(strict_json_dumps(r)); f.with_suffix('.part').rename(f)
            print(f"{dataset} {B} epochs seed {s}: {r['wall_seconds']:.0f} s", flush=True)

if __name__ == '__main__': main(*sys.argv[1:])
