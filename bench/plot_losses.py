"""Plot the per-step training losses of the reference recipe and fedcoder's, step by step.

    python bench/plot_losses.py REFERENCE.json FEDCODER.json docs/performance-loss.png

Each JSON is a bench/train_throughput.py result (one may hold both recipes). Steps are
numbered across the experiment in the order they ran: round, then client, then step.
Prints the largest per-round difference of the two recipes' mean losses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def step_losses(result: dict, recipe: str) -> list[list[float]]:
    """Per round: the losses of every step of every sampled client, in order."""
    rounds = result[recipe]["rounds"]
    return [[loss for client in r["clients"] for loss in client["step_losses"]] for r in rounds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="JSON holding the 'reference' recipe")
    parser.add_argument("fedcoder", type=Path, help="JSON holding the 'fedcoder' recipe")
    parser.add_argument("out", type=Path, help="PNG to write")
    args = parser.parse_args()
    reference_run = json.loads(args.reference.read_text())
    fedcoder_run = json.loads(args.fedcoder.read_text())
    if reference_run["initial_adapter_checksum"] != fedcoder_run["initial_adapter_checksum"]:
        raise SystemExit("the two runs did not start from the same adapter")
    reference = step_losses(reference_run, "reference")
    fedcoder = step_losses(fedcoder_run, "fedcoder")

    figure, axis = plt.subplots(figsize=(9, 4))
    for name, rounds, style in (
        (f"reference (FlowerTune client), {len(reference)} rounds", reference, "-"),
        (f"fedcoder, {len(fedcoder)} rounds", fedcoder, "--"),
    ):
        losses = [loss for r in rounds for loss in r]
        axis.plot(range(1, len(losses) + 1), losses, style, label=name, linewidth=1.2)
    per_round = len(reference[0])
    for boundary in range(per_round, per_round * max(len(reference), len(fedcoder)), per_round):
        axis.axvline(boundary + 0.5, color="0.85", linewidth=0.8, zorder=0)
    axis.set_xlabel(f"optimizer step (rounds of {per_round} steps: 2 clients x 10 steps)")
    axis.set_ylabel("training loss (mean over labelled tokens)")
    axis.set_title("Phi-4-mini-shaped model (random init), Code Alpaca, same data order")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)

    common = list(zip(reference, fedcoder, strict=False))  # the rounds both recipes ran
    gaps = [abs(sum(a) / len(a) - sum(b) / len(b)) for a, b in common]
    steps = sorted(abs(a - b) for ra, rb in common for a, b in zip(ra, rb, strict=True))
    print(
        f"{args.out}: {len(common)} rounds in common; largest per-round mean-loss gap "
        f"{max(gaps):.4f}; per-step gap median {steps[len(steps) // 2]:.4f}, max {steps[-1]:.4f}"
    )


if __name__ == "__main__":
    main()
