"""The new ``laplace.prior_optimization: validation`` on a finished ``adamw`` run: the curvature on its 64 training
questions as ``laplace`` does, then δ from the 50-point grid by the MC predictive's NLL on HOLDOUT held-out
training questions (never trained on, not the validation set). Prints the fit's log lines.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python results/laplace-investigation/valfit.py RUN_DIR HOLDOUT
"""

import sys
from pathlib import Path

from varlora.config import RunConfig
from varlora.methods import build_method
from varlora.run_paths import RunPaths
from varlora.session import setup

run_dir, holdout = Path(sys.argv[1]), int(sys.argv[2])
data = RunConfig.load(RunPaths(run_dir).config).to_dict()
data |= {"method": {"name": "laplace"},
         "laplace": {"prior_optimization": "validation", "prior_holdout": holdout, "link_approx": "mc"}}
session = setup(RunConfig.from_dict(data), Path("/tmp/lapinv/valfit"))
method = build_method(session)
from varlora.methods.adamw import AdamW  # noqa: E402

AdamW.load(method, RunPaths(run_dir).final)
out = method.fit_posthoc(lambda line: print(line, flush=True))
print({k: v for k, v in out.items() if k in ("prior_precision", "effective_params", "fit_seconds")})
