"""Time one analysis command on a synthetic 100,000-sample run for two source trees, interleaved.

    git archive OLD_COMMIT src | tar -x -C /tmp/old
    python -m benchmarks.analysis_ab --before /tmp/old/src --after src [--n 100000] [--rounds 2]

Each round runs the command once per tree, each in its own process, and prints its time and peak
memory (see ``tests.test_analysis_scale.PEAK``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.test_analysis_scale import PEAK, synthetic_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the src/ folder of the old version")
    p.add_argument("--after", default="src", help="the src/ folder of the new version")
    p.add_argument("--n", type=int, default=100_000, help="samples in the synthetic run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    p.add_argument("--command", default="analyze --directory RUN", help="RUN is the run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = synthetic_run(Path(tmp) / "run", args.n)
        command = [a.replace("RUN", str(run)) for a in args.command.split()]
        for round_ in range(args.rounds):
            for label, src in (("before", args.before), ("after", args.after)):
                env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
                r = subprocess.run(
                    [sys.executable, "-c", PEAK, *command],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                peak = [line for line in r.stdout.splitlines() if line.startswith("PEAK")]
                print(f"round {round_ + 1} {label}: {peak[0] if peak else r.stdout[-200:]}")


if __name__ == "__main__":
    main()
