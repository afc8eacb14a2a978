"""Train a small sparse autoencoder on one site of a run, streamed with ``ActivationDataset``.

One linear encoder, a ReLU, one linear decoder; the loss is the reconstruction error plus an L1
penalty on the codes. Runs in seconds on a small run::

    python examples/train_sae.py --run runs/demo --site layer_12 --steps 200
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from actcap.data import ActivationDataset


class SparseAutoencoder(nn.Module):
    """``x -> relu(W_e (x - b) + c) -> W_d h + b``."""

    def __init__(self, hidden: int, features: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(hidden, features)
        self.decoder = nn.Linear(features, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.relu(self.encoder(x - self.decoder.bias))
        return self.decoder(codes), codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory or URL")
    parser.add_argument("--site", default="layer_12", help="site to train on")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--expansion", type=int, default=4, help="features per hidden dimension")
    parser.add_argument("--l1", type=float, default=1e-3, help="L1 penalty on the codes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--shuffle-buffer", type=int, default=100_000)
    args = parser.parse_args()

    ds = ActivationDataset(
        args.run,
        sites=[args.site],
        rows="tokens",
        shuffle_buffer=args.shuffle_buffer,
        batch_size=args.batch_size,  # ready batches: the fast form (docs/performance.md)
    )
    loader = DataLoader(ds, batch_size=None, num_workers=args.workers)
    hidden = next(iter(loader))["x"].shape[-1]
    sae = SparseAutoencoder(hidden, args.expansion * hidden)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    print(f"{args.run} {args.site}: {ds.num_rows():,} tokens, hidden {hidden}")

    step, epoch, start = 0, 0, time.perf_counter()
    while step < args.steps:
        ds.set_epoch(epoch)
        for batch in loader:
            x = batch["x"]
            x = x / x.norm(dim=-1, keepdim=True).mean()  # scale-free: one norm per batch
            recon, codes = sae(x)
            mse = (recon - x).pow(2).sum(-1).mean()
            loss = mse + args.l1 * codes.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % max(1, args.steps // 10) == 0 or step == args.steps:
                alive = (codes > 0).float().sum(-1).mean().item()
                print(f"step {step} loss {loss.item():.4f} mse {mse.item():.4f} L0 {alive:.1f}")
            if step >= args.steps:
                break
        epoch += 1
    print(f"{step} steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
