"""An evaluation's outputs: results.csv, results.md (mean ± std over subjects), plots/ (bars per
metric, ISM drop against PSNR, sample grids per method)."""
from __future__ import annotations

import csv
import math
import os
import re

import numpy as np
from PIL import Image

from ldu_jax import data as data_lib
from ldu_jax import files
from ldu_jax.evaluate.measure import same_size

COLUMNS = ("subject", "method", "setting", "attack", "status", "reason", "n_protected", "psnr", "ssim",
           "linf", "fid_protected", "n_generated", "fdfr", "ism", "ism_others", "ism_drop", "ism_drop_purified",
           "clean_gap", "fd_identity", "brisque", "clip_iqa", "fid_generated", "protect_s_per_image", "seconds",
           "notes")
# (column, label, higher is better for the protection?)
TABLE_METRICS = (("psnr", "PSNR↑", None), ("ssim", "SSIM↑", None), ("fid_protected", "FID(prot)↓", None),
                 ("fdfr", "FDFR↑", True), ("ism", "ISM↓", False), ("ism_others", "ISM(others)", None),
                 ("ism_drop", "ISM drop↑", True), ("ism_drop_purified", "drop vs purified clean↑", True),
                 ("fd_identity", "FD(id)↑", True), ("brisque", "BRISQUE↑", True),
                 ("clip_iqa", "CLIP-IQA↓", False), ("fid_generated", "FID(gen)↑", True),
                 ("protect_s_per_image", "s / image", None))
# shown as the median over subjects: the first subject's protection includes compiling its programs
MEDIAN_METRICS = ("protect_s_per_image",)

def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9.=_-]+", "_", str(text)).strip("_") or "none"


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(path: str, rows):
    with files.atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt(r.get(k)) for k in COLUMNS])


def with_ism_drop(rows) -> list[dict]:
    """``rows`` compared with the clean photos' cells (method 'none') of the same subject and attack,
    where both were measured: ``ism_drop`` = the clean cell's ISM (setting 'none') minus the row's;
    ``ism_drop_purified`` (a purified row) = the ISM of the clean photos given the same purification
    minus the row's; ``clean_gap`` = the clean cell's ISM minus its ISM(others), what a protection
    can take away (a group's *cut* is its mean drop over its mean clean gap)."""
    done = [r for r in rows if r.get("status") == "done"]
    clean = {(r["subject"], r["attack"], r["setting"]): r for r in done if r["method"] == "none"}
    out = []
    for r in rows:
        r, ism = dict(r), _num(r, "ism")
        ref = clean.get((r["subject"], r["attack"], "none"))
        purified = clean.get((r["subject"], r["attack"], r["setting"])) if r["setting"] != "none" else None
        if r.get("status") == "done" and ref is not None:
            own, others = _num(ref, "ism"), _num(ref, "ism_others")
            if None not in (own, ism):
                r["ism_drop"] = own - ism
            if None not in (own, others):
                r["clean_gap"] = own - others
            if purified is not None and None not in (_num(purified, "ism"), ism):
                r["ism_drop_purified"] = _num(purified, "ism") - ism
        out.append(r)
    return out


def _num(r, k):
    v = r.get(k)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if not math.isnan(v) else None


def std(values) -> float:
    """The sample standard deviation (n - 1) of the spread over subjects; 0 for one value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def mean_std(values) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if any(math.isinf(v) for v in vals):
        return "∞"
    m = float(np.mean(vals))
    return f"{m:.3f} ± {std(vals):.3f}" if len(vals) > 1 else f"{m:.3f}"


def median(values) -> str:
    vals = [v for v in values if v is not None]
    return f"{float(np.median(vals)):.3g}" if vals else "–"


def cut(group) -> float | None:
    """The group's mean ISM drop over the mean clean gap of the same subjects (None without both)."""
    pairs = [(d, g) for d, g in zip(group["ism_drop"], group["clean_gap"]) if None not in (d, g)]
    if not pairs or np.mean([g for _, g in pairs]) <= 0:
        return None
    return float(np.mean([d for d, _ in pairs]) / np.mean([g for _, g in pairs]))


def summarize(rows):
    """{(method, setting, attack): {metric: [values over subjects]}} of the finished cells (the
    lists aligned by cell: None where a cell has no value)."""
    keys = [k for k, _, _ in TABLE_METRICS] + ["clean_gap"]
    groups = {}
    for r in rows:
        if r.get("status") != "done":
            continue
        g = groups.setdefault((r["method"], r["setting"], r["attack"]), {k: [] for k in keys})
        for k in keys:
            g[k].append(_num(r, k))
    return groups


def results_markdown(rows, cfg=None) -> str:
    groups = summarize(rows)
    cols = [(k, label) for k, label, _ in TABLE_METRICS if any(v is not None for g in groups.values() for v in g[k])]
    # the cut's column follows the ISM drop's (a cut needs drops)
    at = [k for k, _ in cols].index("ism_drop") + 1 if any(cut(g) is not None for g in groups.values()) else None
    labels = [label for _, label in cols]
    if at is not None:
        labels.insert(at, "cut↑")
    lines = ["# Evaluation results", "",
             "Mean ± sample std (n - 1) over subjects; s / image: the median over subjects of the "
             "protection's seconds per photo. ↑/↓: the direction that means *better protection* "
             "(for PSNR/SSIM/FID(prot): better imperceptibility). ISM drop: against the clean photos' "
             "cell; drop vs purified clean: against the clean photos given the same purification; "
             "cut: the mean ISM drop over the mean clean gap (clean ISM minus ISM(others)).", ""]
    lines.append("| method | setting | attack | n | " + " | ".join(labels) + " |")
    lines.append("|" + "---|" * (4 + len(labels)))
    for (m, s, a), g in groups.items():
        n = len(next(iter(g.values())))
        cells = [median(g[k]) if k in MEDIAN_METRICS else mean_std(g[k]) for k, _ in cols]
        if at is not None:
            c = cut(g)
            cells.insert(at, "–" if c is None else f"{c:.2f}")
        lines.append(f"| {m} | {s} | {a} | {n} | " + " | ".join(cells) + " |")
    other = [r for r in rows if r.get("status") != "done"]
    if other:
        lines += ["", "Cells not measured:", ""]
        lines += [f"- {r['subject']} / {r['method']} / {r['setting']} / {r['attack']}: {r['status']} — {r['reason']}"
                  for r in other]
    notes = sorted({n for r in rows for n in str(r.get("notes") or "").split("; ") if n})
    if notes:
        lines += ["", "Metric notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_results(workdir: str, rows, cfg=None):
    write_csv(os.path.join(workdir, "results.csv"), rows)
    with files.atomic_write(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_markdown(rows, cfg))
    write_plots(workdir, rows)
    write_sample_grids(workdir, rows)


def write_plots(workdir: str, rows):
    """plots/<metric>.png: bars per method, grouped by setting, one panel per attack; and
    plots/ism_drop_vs_psnr.png (``tradeoff_points``), where the rows have both."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = summarize(rows)
    if not groups:
        return
    methods = list(dict.fromkeys(k[0] for k in groups))
    settings = list(dict.fromkeys(k[1] for k in groups))
    attacks = list(dict.fromkeys(k[2] for k in groups))
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    for key, label, _ in TABLE_METRICS:
        if not any(_finite(g[key]) for g in groups.values()):
            continue
        fig, axes = plt.subplots(1, len(attacks), figsize=(4 + 2 * len(methods), 3.2), squeeze=False)
        width = 0.8 / len(settings)
        for ax, a in zip(axes[0], attacks):
            for j, s in enumerate(settings):
                means, stds = [], []
                for m in methods:
                    vals = _finite(groups.get((m, s, a), {}).get(key, []))
                    means.append(np.mean(vals) if vals else np.nan)
                    stds.append(std(vals))
                ax.bar(np.arange(len(methods)) + j * width, means, width, yerr=stds, label=s)
            ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=30)
            ax.set_title(f"{label} — {a}")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        _save(plt, fig, os.path.join(workdir, "plots", f"{key}.png"))
    points = tradeoff_points(groups)
    if points:
        _plot_tradeoff(plt, points, attacks, os.path.join(workdir, "plots", "ism_drop_vs_psnr.png"))


def _save(plt, fig, path):
    with files.atomic_write(path) as f:
        fig.savefig(f, dpi=80, format="png")
    plt.close(fig)


def _finite(values):
    return [v for v in values if v is not None and math.isfinite(v)]


def tradeoff_points(groups) -> list[tuple]:
    """(method, setting, attack, PSNR mean, ISM drop mean, ISM drop std) of every group of
    ``summarize`` with a finite PSNR (a protection: the clean photos have none) and an ISM drop."""
    out = []
    for (m, s, a), g in groups.items():
        psnr, drop = _finite(g["psnr"]), _finite(g["ism_drop"])
        if psnr and drop:
            out.append((m, s, a, float(np.mean(psnr)), float(np.mean(drop)), std(drop)))
    return out


def tradeoff_styles(points) -> dict:
    """{method: (colour index, filled)}: a method and its variants (``name@variant``, e.g. at the
    published budget) share the base method's colour; the base is drawn filled, a variant hollow."""
    bases = list(dict.fromkeys(p[0].split("@")[0] for p in points))
    return {m: (bases.index(m.split("@")[0]), "@" not in m) for m in dict.fromkeys(p[0] for p in points)}


def tradeoff_curves(points) -> dict:
    """{(base method, setting, attack): [(PSNR, ISM drop), ...] by PSNR}: a method's budgets,
    joined in the plot, where it has more than one."""
    curves = {}
    for m, s, a, psnr, drop, _ in points:
        curves.setdefault((m.split("@")[0], s, a), []).append((psnr, drop))
    return {k: sorted(v) for k, v in curves.items() if len(v) > 1}


def _plot_tradeoff(plt, points, attacks, path):
    """One panel per attack: ISM drop (mean ± std over subjects) against the protected photos' PSNR;
    a colour per base method (``tradeoff_styles``), a marker per setting, a thin line through a
    method's budgets (``tradeoff_curves``)."""
    settings = list(dict.fromkeys(p[1] for p in points))
    styles = tradeoff_styles(points)
    n_colours = 1 + max(c for c, _ in styles.values())
    cmap = plt.get_cmap("tab10" if n_colours <= 10 else "tab20")
    colour = lambda i: cmap(i % cmap.N)   # noqa: E731
    markers = "osD^v<>px*"
    fig, axes = plt.subplots(1, len(attacks), figsize=(7.5 * len(attacks), 4.2), squeeze=False)
    curves = tradeoff_curves(points)
    base_colour = {m.split("@")[0]: c for m, (c, _) in styles.items()}
    for ax, a in zip(axes[0], attacks):
        for (base, s, pa), xy in curves.items():
            if pa == a:
                ax.plot(*zip(*xy), color=colour(base_colour[base]), lw=0.6, alpha=0.6)
        for m, s, pa, psnr, drop, std in points:
            if pa != a:
                continue
            c, filled = styles[m]
            ax.errorbar(psnr, drop, yerr=std, fmt=markers[settings.index(s) % len(markers)], color=colour(c),
                        markerfacecolor=colour(c) if filled else "none", capsize=2, label=f"{m} / {s}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("PSNR of the protected photos (dB)")
        ax.set_ylabel("ISM drop vs clean ↑")
        ax.set_title(f"ISM drop against PSNR — {a}")
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    _save(plt, fig, path)


def write_sample_grids(workdir: str, rows, per_cell: int = 4):
    """plots/samples_<method>.png: for the first subject, one row of generated images per setting x attack."""
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        return
    subject = done[0]["subject"]
    for method in dict.fromkeys(r["method"] for r in done):
        tiles = []
        for r in done:
            if r["subject"] != subject or r["method"] != method:
                continue
            sample_dir = os.path.join(workdir, "cells", subject, method, slug(r["setting"]), r["attack"], "samples")
            imgs = []
            for root, _, names in sorted(os.walk(sample_dir)):
                imgs += [os.path.join(root, f) for f in sorted(names) if f.endswith(".png")]
            row = [np.asarray(Image.open(p).convert("RGB")) for p in imgs[:per_cell]]
            if row:
                row = same_size(row)
                tiles += row + [np.full_like(row[0], 255)] * (per_cell - len(row))
        if tiles:
            tiles = same_size(tiles)
            data_lib.save_image_atomic(os.path.join(workdir, "plots", f"samples_{slug(method)}.png"),
                                       data_lib.make_grid(np.stack(tiles), ncol=per_cell))
