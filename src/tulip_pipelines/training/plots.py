"""Figures of a training run (matplotlib, no tracking)."""

from __future__ import annotations

import pandas as pd


def loss_figure(history: pd.DataFrame, stage: str):
    """Training loss (and validation loss, learning rate) per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if not history.empty:
        ax.plot(history["step"], history["loss"], label="train loss")
        val_cols = [c for c in history.columns if c.startswith("val_") and "loss" in c]
        for col in val_cols[:1]:
            rows = history.dropna(subset=[col])
            ax.plot(rows["step"], rows[col], "o-", label=col.replace("_", " "))
        lr_ax = ax.twinx()
        lr_ax.plot(history["step"], history["lr"], color="grey", alpha=0.4, label="lr")
        lr_ax.set_ylabel("learning rate")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage}: loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig
