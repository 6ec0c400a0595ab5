"""Record a finished `welfare-server train` run: its held-out evaluations (means with 95% CIs), the
train curve's wall time, and the settings that differ from the preset, as rows of
bench/results/train_runs.csv; the run's metrics.jsonl is copied beside it under
bench/results/train_runs/ so the curve stays with the rows.

    python bench/record_train_run.py runs/train --preset cpu-demo --note "quiet machine"
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from _common import RESULTS_DIR, append_rows, git_commit, machine_name, utc_now  # bench/ is sys.path[0]

FIELDS = ["date", "machine", "commit", "run", "preset", "settings", "step", "episodes", "return", "return_ci95",
          "gold", "gold_ci95", "mold", "mold_ci95", "regret", "train_wall_s", "note"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="the run's out_dir (metrics.jsonl, checkpoints/)")
    ap.add_argument("--preset", default=None, help="the preset the run started from (its changes are listed)")
    ap.add_argument("--name", default=None, help="name of the run in the results (default: the directory's)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "train_runs.csv"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    from welfare_server.train.checkpoint import latest_checkpoint
    from welfare_server.train.config import PRESETS, TrainConfig

    run_dir = Path(args.run_dir)
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    checkpoint = latest_checkpoint(run_dir)
    settings = ""
    if checkpoint is not None:
        config = json.load(open(checkpoint / "meta.json"))["config"]
        base = dict(TrainConfig().__dict__, **PRESETS.get(args.preset, {}))
        changed = {k: v for k, v in config.items() if k not in ("maze", "out_dir", "progress") and base.get(k) != v}
        settings = json.dumps(changed, sort_keys=True)
    name = args.name or run_dir.name
    copy = RESULTS_DIR / "train_runs" / f"{name}.metrics.jsonl"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", copy)
    train_wall = sum(r.get("step_s", 0.0) for r in records if r["kind"] == "train")
    stamp = dict(date=utc_now(), machine=machine_name("cpu"), commit=git_commit(), run=name, preset=args.preset or "",
                 settings=settings, train_wall_s=f"{train_wall:.0f}", note=args.note)
    rows = [dict(stamp, step=r["step"], episodes=r["episodes"],
                 **{k: f"{r[k]:.3f}" for k in ("return", "return_ci95", "gold", "gold_ci95", "mold", "mold_ci95",
                                                 "regret")})
            for r in records if r["kind"] == "eval"]
    append_rows(args.out, FIELDS, rows)
    for row in rows:
        print(f"step {row['step']:>4}: return {row['return']} ± {row['return_ci95']}  gold {row['gold']} ± "
              f"{row['gold_ci95']}  mold {row['mold']} ± {row['mold_ci95']}")
    print(f"wrote {len(rows)} rows to {args.out}; the curve to {copy}")


if __name__ == "__main__":
    main()
