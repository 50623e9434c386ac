"""One-off (issue 20): the notebooks cited "SPEC §1/§2", a file the reader does not have; this rewrites those
sentences to say what it says. Idempotent: prints NOT FOUND for a sentence already rewritten or changed since.
`python tools/rewrite_spec_refs.py && nbdev-clean`; `tools/nbcheck.py --check` flags any citation left."""
import json,sys
R = {
 'nbs/01_models.ipynb': [
  ("so that teacher tensors can be centre-cropped into the student (SPEC §2).",
   "so that teacher tensors can be centre-cropped into the student, which is how the original SPRKD notebook and paper inject a teacher into a smaller student."),
  ("`SeedCNN` is the network of the dense-Hessian notebook (SPEC §1-B):",
   "`SeedCNN` is the network of the research notebook that computed the full Hessian of a small MNIST CNN entry by entry (a double loop that took about 152 s on a GPU):")],
 'nbs/02_core.ipynb': [("(SPEC §1-B's seed CNN:", "(the dense-Hessian research notebook's `SeedCNN`:")],
 'nbs/05_analysis.ipynb': [
  ("The dense-Hessian notebook (SPEC §1-B) measured", "The research notebook that computed the full Hessian of a 1,710-parameter MNIST CNN (`SeedCNN`) measured"),
  ("The sharpness notebook (SPEC §1-E, arXiv 2306.00204) tracks", "A research notebook on the sharpness of optimizer steps (after Pan & Li 2023, arXiv 2306.00204) tracks")],
 'nbs/12_sprkd.ipynb': [
  ("SPRKD (SPEC §2) has three actors", "SPRKD (Saddle Point Recruitment for Knowledge Distillation, as its original notebook and paper define it) has three actors"),
  ("| original (SPEC §2) |", "| original notebook |"),
  ('(SPEC §2: "several documented parameters were never used")', "(several of the original's documented parameters were never used)")],
 'nbs/20_story.ipynb': [("The story (SPEC §2):", "The story, after the original SPRKD notebook and paper:")],
 'nbs/95_tutorial.ipynb': [("(as in the SPRKD paper, SPEC §2).", "(as in the SPRKD paper, which injects a teacher into a smaller student by centre crop).")],
}
for f, reps in R.items():
    nb = json.load(open(f))
    for old, new in reps:
        n = 0
        for c in nb['cells']:
            if c['cell_type'] != 'markdown': continue
            s = ''.join(c['source'])
            if old in s: s = s.replace(old, new); c['source'] = s.splitlines(True); n += 1
        if not n: print('NOT FOUND (already done?)', f, old[:50])
    open(f, 'w').write(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + '\n')
