"""PNG of the coefficient and loss trajectories, embedded in the card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def plot_trajectories(result: dict, path: Path) -> Optional[Path]:
    """Two panels: α per expert over steps with the returned α marked, and the SPSA losses L± on a log scale.
    Returns the path, or None without history."""
    history = result.get("history") or []
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_a, ax_l) = plt.subplots(1, 2, figsize=(10, 3.6))
    returned = result.get("coefficients") or {}
    for expert in result["experts"]:
        line, = ax_a.plot(steps, [h["coefficients"][expert["name"]] for h in history], label=expert["name"])
        if expert["name"] in returned:  # the answer kept (averaged or selected), at the search's end
            ax_a.plot([steps[-1]], [returned[expert["name"]]], marker="*", markersize=11, color=line.get_color(),
                      linestyle="none")
    ax_a.plot([], [], marker="*", color="gray", linestyle="none", label="returned α")
    ax_a.set(title="Coefficients α", xlabel="step",
             ylabel="α (mean over groups)" if result.get("group_coefficients") else "α", ylim=(-0.02, 1.02))
    ax_a.legend(fontsize=8)
    if "loss_plus" in history[0]:
        ax_l.plot(steps, [h["loss_plus"] for h in history], label="L+", alpha=0.8)
        ax_l.plot(steps, [h["loss_minus"] for h in history], label="L−", alpha=0.8)
        ax_l.set(title="Target loss of the perturbed blends", xlabel="step", ylabel="loss (log scale)")
    else:
        ax_l.plot(steps, [h["loss"] for h in history], label="loss")
        ax_l.set(title="Target training loss", xlabel="step", ylabel="loss (log scale)")
    if all(v > 0 for h in history for k, v in h.items() if k.startswith("loss") and isinstance(v, (int, float))):
        ax_l.set_yscale("log")
    ax_l.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
