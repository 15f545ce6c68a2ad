"""Pictures of expert routing (matplotlib, from the optional `plot` extra).

matplotlib is imported only when a picture is drawn, and `require` checks it is there
before a long model load, so a missing extra is a one-line error, not a late traceback.
"""

from __future__ import annotations

import os

import numpy as np

from grok.errors import GrokError
from grok.routing import ExpertUsage

INSTALL_HINT = 'pip install "grok1-jax[plot]"'


def require() -> None:
    """Raises GrokError naming the extra when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise GrokError(f"drawing expert usage needs matplotlib, which is not installed: "
                        f"{INSTALL_HINT}") from None


def _pyplot():
    require()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def usage_figure(usage: ExpertUsage, title: str = "Expert usage",
                 path: str | os.PathLike | None = None):
    """Heat maps of each expert's share of its layer's tokens (layers x experts), one panel
    for prefill and one for decode, with each layer's imbalance (max share / mean share)
    beside them. Saved to `path` as PNG when given; returns the figure."""
    plt = _pyplot()
    layers, experts = usage.prefill.shape
    height = max(3.0, 0.3 * layers + 1.6)
    fig, axes = plt.subplots(1, 3, figsize=(12, height),
                             gridspec_kw={"width_ratios": [experts, experts, 4]})
    for ax, phase in zip(axes[:2], ("prefill", "decode"), strict=True):
        share = usage.share(phase)
        image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0,
                          vmax=max(share.max(), 1e-9), interpolation="nearest")
        tokens = getattr(usage, f"{phase}_tokens")
        ax.set_title(f"{phase}: share of tokens ({tokens} tokens)")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(experts))
        ax.set_yticks(range(layers))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax = axes[2]
    y = np.arange(layers)
    ax.barh(y - 0.2, usage.imbalance("prefill"), height=0.4, label="prefill")
    ax.barh(y + 0.2, usage.imbalance("decode"), height=0.4, label="decode")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_ylim(layers - 0.5, -0.5)
    ax.set_yticks(range(layers))
    ax.set_title("imbalance")
    ax.set_xlabel("max share / mean share")
    ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def labels_figure(shares: dict[str, np.ndarray], distance: np.ndarray,
                  path: str | os.PathLike, title: str = "Expert usage by label") -> None:
    """One heat map of expert shares [L, E] per label, and the label-to-label distance
    matrix, saved as PNG."""
    plt = _pyplot()
    labels = list(shares)
    layers, experts = next(iter(shares.values())).shape
    fig, axes = plt.subplots(1, len(labels) + 1,
                             figsize=(3.2 * (len(labels) + 1), max(3.0, 0.3 * layers + 1.6)))
    top = max(float(s.max()) for s in shares.values()) or 1.0
    for ax, label in zip(axes, labels, strict=False):
        ax.imshow(shares[label], aspect="auto", cmap="viridis", vmin=0, vmax=top,
                  interpolation="nearest")
        ax.set_title(label)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(experts))
    ax = axes[-1]
    image = ax.imshow(distance, cmap="magma", vmin=0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title("mean Jensen-Shannon distance")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
