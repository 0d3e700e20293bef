"""Pictures: the quality table as ΔPPL against bits per weight (one line per codec family),
and a 2-D codebook's constellation with its Voronoi cells. matplotlib (Agg backend)."""
import os


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_quality(result, path):
    """ΔPPL % against bits per weight, one line per codec family, from a quality_table()
    result (or its JSON). Returns path."""
    plt = _plt()
    rows = result["rows"]
    fams = {}
    for r in rows:
        fams.setdefault(r["family"], []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = "osD^v<>ph*"
    for k, (fam, rs) in enumerate(sorted(fams.items())):
        rs = sorted(rs, key=lambda r: r["bpw"])
        ax.plot([r["bpw"] for r in rs], [r["dppl_pct"] for r in rs], marker=markers[k % 10],
                label=fam, linewidth=1.5 if len(rs) > 1 else 0)
        for r in rs:
            ax.annotate(r["config"], (r["bpw"], r["dppl_pct"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
    if min((r["dppl_pct"] for r in rows), default=1.0) <= 0:
        ax.axhline(0.0, color="gray", linewidth=0.8)
    ys = [r["dppl_pct"] for r in rows] or [1.0]
    if min(ys) > 0 and max(ys) > 10 * min(ys):
        ax.set_yscale("log")
    elif max(ys) > 20 * max(0.1, min(abs(y) for y in ys)):
        ax.set_yscale("symlog", linthresh=0.5)
    ax.set_xlabel("bits per weight (quantized linears, all side information included)")
    ax.set_ylabel("ΔPPL vs full model (%)")
    p = result.get("protocol", {})
    ax.set_title(f"{os.path.basename(str(result.get('model', '')))}: "
                 f"{p.get('tokens', '?')} eval tokens, window {p.get('window', '?')}",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_constellation(path, bits=6, kind="qam", codebook=None, show_density=True):
    """The 2^bits points of a shipped 2-D codebook ("qam": joint Lloyd-Max for N(0, I2);
    "polar": amplitude x phase) with their Voronoi cells. Returns path."""
    import numpy as np
    from scipy.spatial import Voronoi, voronoi_plot_2d

    if codebook is None:
        from . import codebooks

        codebook = codebooks.get(codebooks.codebook_id(kind, bits))
    pts = codebook.detach().cpu().double().numpy()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 6.4))
    r = float(np.abs(pts).max()) * 1.15 + 0.2
    if show_density:
        g = np.linspace(-r, r, 300)
        X, Y = np.meshgrid(g, g)
        ax.contourf(X, Y, np.exp(-(X ** 2 + Y ** 2) / 2), levels=12, cmap="Blues", alpha=0.35)
    # Mirror points far outside so that every cell is finite and clipped by the view.
    far = 8 * r * np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]])
    vor = Voronoi(np.vstack([pts, far]))
    voronoi_plot_2d(vor, ax=ax, show_points=False, show_vertices=False, line_width=0.6,
                    line_colors="k", line_alpha=0.6)
    ax.plot(pts[:, 0], pts[:, 1], ".", color="crimson", markersize=max(1.5, 8 - bits * 0.5))
    ax.set_xlim(-r, r)
    ax.set_ylim(-r, r)
    ax.set_aspect("equal")
    ax.set_title(f"{kind} codebook, {len(pts)} points ({bits} bits per pair = {bits / 2:g} "
                 "bits/weight), Voronoi cells", fontsize=9)
    path = _save(fig, path)
    plt.close(fig)
    return path
