"""Plot a bench/pipeline.py result: p50 latency and throughput against concurrency, one line per path.

    python bench/plot.py bench/results/pipeline-<date>.json [out.png]

matplotlib is not a project dependency: without it nothing is drawn and a one-line message says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PATHS = ("echo", "floor", "file_read", "env_read", "denied", "file_read_packs")
STYLE = {
    "echo": dict(color="tab:gray", marker="o"),
    "floor": dict(color="black", marker="s", linestyle="--"),
    "file_read": dict(color="tab:blue", marker="^"),
    "env_read": dict(color="tab:green", marker="v"),
    "denied": dict(color="tab:red", marker="x"),
    "file_read_packs": dict(color="tab:purple", marker="D", linestyle=":"),
}


def plot_results(res: dict[str, Any], png: Path) -> str:
    """Write `png`; returns a one-line message (what was written, or why nothing was)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return "PNG: not written: matplotlib is not installed (`.venv/bin/pip install matplotlib`, then `python bench/plot.py <json>`)"
    fig, (lat_ax, rps_ax) = plt.subplots(1, 2, figsize=(13, 5.2))
    for name in PATHS:
        ladder = res["paths"].get(name, {}).get("ladder", [])
        pts = [p for p in ladder if p.get("p50_ms") is not None]
        if not pts:
            continue
        cs = [p["c"] for p in pts]
        lat_ax.plot(cs, [p["p50_ms"] for p in pts], label=name, **STYLE[name])
        rps_ax.plot(cs, [p["rps"] for p in pts], label=name, **STYLE[name])
    ladder = res.get("params", {}).get("ladder") or []
    for ax in (lat_ax, rps_ax):
        ax.set_xscale("log", base=2)
        if ladder:
            ax.set_xticks(ladder, [str(c) for c in ladder])
            ax.minorticks_off()
        ax.set_xlabel("concurrency (requests in flight, closed loop)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    lat_ax.set_yscale("log")
    rps_ax.set_yscale("log")
    for ax in (lat_ax, rps_ax):
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    lat_ax.set_ylabel("p50 latency, ms (log)")
    lat_ax.set_title("p50 latency")
    rps_ax.set_ylabel("requests / s (log)")
    rps_ax.set_title("throughput")
    meta = res.get("meta", {})
    params = res.get("params", {})
    fig.suptitle(
        f"Rumi request pipeline, {meta.get('date', '')}, git {str(meta.get('git', {}).get('head', ''))[:10]}, "
        f"sync_interval {meta.get('jetstream_sync', '?')}, {params.get('seconds', '?')} s/point, "
        f"{meta.get('machine', {}).get('cpus', '?')} CPUs"
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return f"PNG: {png}"


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    src = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) == 3 else src.with_suffix(".png")
    print(plot_results(json.loads(src.read_text()), out))


if __name__ == "__main__":
    main()
