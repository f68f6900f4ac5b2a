#!/usr/bin/env bash
# Run the `cpu` study with one `varlora experiment cpu` process per core (or $1 processes), each with one thread,
# started 20 s apart so that they claim different runs, and each restarted up to three times after a failure.
# Logs: runs/study-<i>.log. Every process rewrites the report and the records in results/experiment-cpu/ after
# each run it finishes; commit that folder to keep the progress. Rerunning this script continues the study.
# Usage, from the repository root: nohup scripts/cpu_study.sh [processes] &
set -u
cd "$(dirname "$0")/.."
processes=${1:-$(nproc)}
mkdir -p runs
for i in $(seq 1 "$processes"); do
  (
    for attempt in 1 2 3 4; do
      OMP_NUM_THREADS=1 TQDM_DISABLE=1 .venv/bin/varlora experiment cpu && break
      echo "attempt $attempt failed; restarting" >&2
      sleep 5
    done
  ) >> "runs/study-$i.log" 2>&1 &
  sleep 20
done
wait
