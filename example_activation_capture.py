"""Walk through actcap's core calls on the built-in model.

Run from the repository root:  python example_activation_capture.py [--out DIR]
(the files go to DIR, ``example_activations/`` by default).

1. answer a prompt and capture the embeddings and every layer's residual stream;
2. save them to a .safetensors file and load them back (whole, and one layer lazily);
3. capture a second prompt and compare the two prompts' activations layer by layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from actcap import load_activations
from actcap.api import capture


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


def main() -> None:
    """Run the walkthrough and print what each step gives."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="example_activations", help="folder for the two activation files"
    )
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    first = out / "france.safetensors"

    # 1-2. Capture while answering, and save.
    (france,) = capture(
        "What is the capital of France?",
        "default",
        save=first,
        layers=None,  # embeddings + all 30 layers
    )
    print(f"Response: {france.response}")
    acts = france.activations
    print(
        f"Captured {len(acts)} sites; layer_0 has shape {tuple(acts['layer_0'].shape)} (tokens, hidden)"
    )

    loaded = load_activations(first)
    print(
        f"Loaded back: model={loaded['model']}, {len(loaded['input_ids'])} prompt tokens, "
        f"timestamp={loaded['timestamp']}"
    )
    assert torch.equal(loaded["activations"]["layer_5"], acts["layer_5"])
    one = load_activations(first, sites=["layer_15"])
    print(f"Lazy read of one site: {list(one['activations'])}")

    # 3. A second prompt, last-token vectors, compared layer by layer.
    second = out / "germany.safetensors"
    (germany,) = capture(
        "What is the capital of Germany?", "default", save=second, layers=[0, 10, 20, -1]
    )
    print(f"Second response: {germany.response}")
    b = load_activations(second)["activations"]
    print("Cosine similarity of the two prompts' last-token residual stream:")
    for site in b:
        print(f"  {site:>9}: {cosine(loaded['activations'][site][-1], b[site][-1]):.3f}")
    print(f"Files are in {out}")


if __name__ == "__main__":
    main()
