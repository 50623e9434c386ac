"""Merge the per-(budget, seed) files of `bench/ablation_runs.py` into `experiment.json`/`experiment.md`, exactly as
`run_experiment` reports them (Holm over every comparison of every budget); each budget over the seeds that finished at it.

    python bench/ablation_report.py mnist1d runs/mnist1d docs/experiment_mnist1d_ablation 'the command' [5,15]
"""
import json, sys
from dataclasses import asdict
from pathlib import Path
from fastsprkd.experiment import StoryConfig, ARMS, summarize, experiment_markdown, machine_info
from fastsprkd.experiment.report import strict_json_dumps

def main(dataset, runs_dir, out, command='', only=''):
    "Merge the run files of `runs_dir` into `out`.json/.md."
    runs = [json.loads(f.read_text()) for f in sorted(Path(runs_dir).glob('run_*.json'))]
    if only: runs = [r for r in runs if r['epochs'] in {int(b) for b in only.split(',')}]  # e.g. '5,15'
    budgets = sorted({r['epochs'] for r in runs})
    seeds = sorted({r['seed'] for r in runs})  # each budget is summarized and tested over the seeds that finished at it
    runs = sorted(runs, key=lambda r: (r['epochs'], r['seed']))
    for r in runs:
        for k, m in r['metrics'].items():
            for a, v in m.items():
                if v is None: m[a] = float('nan')  # JSON null: NaN
    cfg = StoryConfig(dataset=dataset, arms=ARMS, epochs=budgets[0])
    result = dict(command=command, config=asdict(cfg), seeds=seeds, budgets=budgets, describe=runs[0].pop('describe'),
                  runs=[{k: v for k, v in r.items() if k != 'describe'} for r in runs],
                  summary=summarize(runs, arms=ARMS), machine=machine_info(),
                  wall_seconds=sum(r['wall_seconds'] for r in runs))
    out = Path(out)
    out.with_suffix('.json').write_text(strict_json_dumps(result) + '\n')
    per = {B: sorted(r['seed'] for r in runs if r['epochs'] == B) for B in budgets}
    note = (f"\n**How this was run.** `{command or 'bench/ablation_runs.py'}`: the stories were split over several processes "
            f"(`bench/ablation_runs.py`, one JSON file per budget and seed) on a 2-core CPU machine shared with other work, "
            f"and merged by `bench/ablation_report.py`. Seeds per budget: "
            + '; '.join(f"{B} epochs: {per[B]}" for B in budgets)
            + f". The total CPU wall time ({result['wall_seconds']:.0f} s) is the sum of the per-(budget, seed) wall times.\n")
    md = experiment_markdown(result).replace("per-seed values are in `experiment.json` and `runs.csv`",
                                             f"per-seed values are in `{out.name}.json`")
    if dataset == 'mnist1d': note += ("\nThe bundled MLP and CNN against the MNIST-1D paper's figures: "
                                      "[mnist1d_baselines.md](mnist1d_baselines.md).\n")
    out.with_suffix('.md').write_text(md + note)
    per = {B: sorted(r['seed'] for r in runs if r['epochs'] == B) for B in budgets}
    print(f"{dataset}: seeds per budget {per}; {result['wall_seconds']:.0f} s of runs; {out.with_suffix('.md')}")

if __name__ == '__main__': main(*sys.argv[1:])
