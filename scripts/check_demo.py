"""Check that the demo's head learned: its held-out acceptance length and the training log's
simulated one (make demo runs it last).

    python scripts/check_demo.py runs/demo --min-acceptance 1.15 --max-gap 0.10

Reads <run>/eval.json (the evaluator on held-out prompts) and <run>/final/metrics.json (the
held-out simulated acceptance length of the training log); exits 1 when the measured value is
below --min-acceptance or the two differ by more than --max-gap (relative).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the demo's train.output_dir")
    p.add_argument("--min-acceptance", type=float, default=1.15)
    p.add_argument("--max-gap", type=float, default=0.10, help="allowed relative difference")
    a = p.parse_args(argv)
    run = Path(a.run)
    try:
        measured = json.loads((run / "eval.json").read_text())["acceptance_length"]
        simulated = json.loads((run / "final" / "metrics.json").read_text())["heldout_simulated_acceptance_length"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: {run} holds no finished demo run with an evaluation ({exc})") from None
    gap = abs(measured - simulated) / simulated
    ok = measured >= a.min_acceptance and gap <= a.max_gap
    print(f"held-out acceptance length {measured:.3f} (needs >= {a.min_acceptance}); simulated by the training log "
          f"{simulated:.3f}, {gap:.1%} apart (allowed {a.max_gap:.0%}) -> {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
