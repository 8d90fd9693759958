"""PNG plots of a suite run: throughput and latency over time, and the ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """Write ``throughput.png``, ``latency.png`` and ``ratios.png`` into ``out``."""
    series = results["series"]
    label = (
        f"{results['mode']} run, {results['machine']['date']}, {results['machine']['cores']} cores"
    )
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    collector = results["collector"]
    protocols = collector.get("protocols") or {}
    names = ["bare handler", *(f"collector: {name}" for name in protocols)]
    values = [collector["bare_requests_per_s"], *(p["requests_per_s"] for p in protocols.values())]
    bars = axes[0].barh(names, values, color="tab:blue")
    axes[0].bar_label(bars, fmt="%.0f", fontsize=8)
    axes[0].set(
        title=f"requests/s at the maximum ({collector.get('generator', 'python')}), 20 events each",
        xlabel="requests/s",
    )
    for name in ("collector_half", "e2e_max", "e2e_half"):
        points = series.get(name, [])
        axes[1].plot([p["t"] for p in points], [p["events_per_s"] for p in points], label=name)
    axes[1].set(title="events accepted/s", xlabel="s", ylabel="events/s")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in ("collector_half", "e2e_half"):
        points = series.get(name, [])
        t = [p["t"] for p in points]
        ax.plot(t, [p["p50_ms"] for p in points], label=f"{name} p50")
        ax.plot(t, [p["p99_ms"] for p in points], label=f"{name} p99", linestyle="--")
    ax.axhline(10, color="red", linewidth=0.8, label="collector p99 target (10 ms)")
    ax.set(
        title="request latency at half max rate (from intended send time)", xlabel="s", ylabel="ms"
    )
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    behavior = results["loader"].get("behavior") or {}
    ratios = [
        ("collector / bare", results["collector"]["ratio_vs_bare"], 0.35),
        *(
            (f"{name} / native events/s", p["events_vs_native"], 0.85)
            for name, p in protocols.items()
            if name in ("segment", "snowplow", "posthog")
        ),
        ("loader / raw COPY (events)", results["loader"]["ratio_vs_copy"], 0.9),
        *(
            [("loader / COPY + sessions (behavior)", behavior["ratio_vs_copy"], 0.9)]
            if behavior
            else []
        ),
        ("2 / 1 collector workers", results["scaling"]["collector_2_vs_1"], None),
        ("2 / 1 loader processes", results["scaling"]["loader_2_vs_1"], None),
        ("loader / naive INSERT", results["naive"]["loader_vs_naive"], None),
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh([r[0] for r in ratios], [r[1] for r in ratios], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    for i, (_, _, target) in enumerate(ratios):
        if target is not None:
            ax.plot([target, target], [i - 0.4, i + 0.4], color="red", linewidth=2)
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set(title="ratios vs same-run baselines (red: target)", xlabel="ratio (log)")
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    paths.append(out / "ratios.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths
