"""The main job, with the flags of the pipeline actcap grew from.

    python main.py --capture_activations --activation_save_dir my_activations

answers the built-in demo benchmark with the built-in model, grades it, and writes every sample's
activations into the run directory ``--activation_save_dir``. It calls the facade's
:func:`actcap.api.evaluate`, as ``actcap eval`` does, and prints the same summary.
"""

from __future__ import annotations

import argparse
import sys

from actcap import api
from actcap.bench.runner import EvalOptions
from actcap.capture.spec import CaptureSpec
from actcap.cli.common import interrupted_message, one_line_warnings
from actcap.errors import ActcapError


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags, each with its help text."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--capture_activations", action="store_true", help="Capture and store activations."
    )
    p.add_argument(
        "--activation_save_dir", default="activations", help="Run directory for the activations."
    )
    p.add_argument(
        "--model", default="default", help="'default', a hub id, a folder or a .gguf file."
    )
    p.add_argument(
        "--benchmark",
        default="demo",
        help="demo, mmlu:PATH, gsm8k:PATH, ... (see actcap eval --help).",
    )
    p.add_argument("--limit", type=int, default=None, help="Answer only the first N questions.")
    p.add_argument(
        "--batch_size",
        type=int,
        default=8,
        help="Questions per forward pass (default 8; the answers do not depend on it).",
    )
    p.add_argument("--layers", default=None, help="Layers to capture (default: embeddings + all).")
    p.add_argument(
        "--token_selection",
        default="all",
        choices=["all", "last", "mean"],
        help="Keep every token's activations, the last token's, or their mean (default all).",
    )
    p.add_argument(
        "--few_shot",
        type=int,
        default=0,
        help="Solved examples shown before each question (default 0).",
    )
    p.add_argument("--resume", action="store_true", help="Continue an interrupted run.")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run the evaluation, print the accuracy and where the files are."""
    p = build_parser()
    args = p.parse_args(argv)
    one_line_warnings()
    try:
        capture = (
            CaptureSpec(layers=args.layers, token_selection=args.token_selection)
            if args.capture_activations
            else None
        )
        result = api.evaluate(
            args.benchmark,
            args.model,
            out=args.activation_save_dir,
            capture=capture,
            options=EvalOptions(
                batch_size=args.batch_size, limit=args.limit, few_shot=args.few_shot
            ),
            resume=args.resume,
            load={"device": args.device},
        )
    except ActcapError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            interrupted_message(args.activation_save_dir, "--activation_save_dir"),
            file=sys.stderr,
        )
        return 130
    api.print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
