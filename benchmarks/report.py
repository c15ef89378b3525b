"""The markdown tables and the plot, from a results dict (results.json); nothing here measures.

`python -m benchmarks report RESULTS.json [--markdown M] [--png P]` redraws both from a file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks import SECTIONS, log

HERE = Path(__file__).resolve().parent
NAMES = {"limit": "(a) limit: Runner.run on pre-decoded uint8", "decode": "(b) decode alone",
         "inproc": "(c') pipeline worker in-process, no Ray", "pipeline": "(c) pipeline end to end (run_job)",
         "naive": "(d) naive: DataLoader+wds+sync loop+pandas", "raydata": "(e) Ray Data + actor pool"}
PLOT_ORDER = ["limit", "decode", "inproc", "pipeline", "naive", "raydata"]
PLOT_LABELS = {"limit": "(a) limit", "decode": "(b) decode", "inproc": "(c') worker\nno Ray",
               "pipeline": "(c) pipeline", "naive": "(d) naive", "raydata": "(e) Ray Data"}


# =============================================================================== views of the runs
def model_proc_rss(r: dict[str, Any]) -> float | None:
    """Peak RSS of the process that ran the model: the Ray actor for (c) and (e), else the section's."""
    m = r.get("memory_mib", {})
    if r["section"] in ("pipeline", "raydata"):
        return m.get("max_single_rss_model_worker")
    return m.get("max_single_rss_driver")


def variant(r: dict[str, Any]) -> str:
    return f"{r['preset']}{' +teacher' if r.get('teacher') else ''}"


def sorted_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs grouped by model (in the order first run), then plain before +teacher, then section order."""
    first: dict[str, int] = {}
    for r in results["runs"]:
        first.setdefault(r["preset"], len(first))
    return sorted(results["runs"], key=lambda r: (first[r["preset"]], bool(r.get("teacher")),
                                                  SECTIONS.index(r["section"])))


def steady_of(r: dict[str, Any]) -> float:
    """Steady-state img/s: after the first unit of output for c/d/e; the plain rate for a/b/c'."""
    return r.get("steady_img_s") or r["img_s"]


def fastest(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(variant, section) -> its run; with several decode modes, the faster one stands for the section."""
    by: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results["runs"]:
        if r.get("ok"):
            k = (variant(r), r["section"])
            if k not in by or steady_of(r) > steady_of(by[k]):
                by[k] = r
    return by


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant: (c)'s wall and steady rates, and (c) over each of a, b, d, e as (wall, steady)."""
    out = []
    by = fastest(results)
    for v in dict.fromkeys(variant(r) for r in results["runs"]):
        c = by.get((v, "pipeline"))
        if not c:
            continue
        row: dict[str, Any] = {"variant": v, "wall": c["img_s"], "steady": steady_of(c)}
        for sec in ("limit", "decode", "naive", "raydata"):
            if (v, sec) in by:
                o = by[(v, sec)]
                row[sec] = (round(c["img_s"] / o["img_s"], 3), round(steady_of(c) / steady_of(o), 3))
        out.append(row)
    return out


# =============================================================================== markdown
def _throughput_table(results: dict[str, Any]) -> list[str]:
    peak = results["meta"].get("peak_tflops")
    cuda = bool(results["meta"]["hardware"].get("cuda"))
    head = ("| section | model | images | wall s | img/s (wall) | img/s (steady) | GFLOP/img | TFLOP/s (steady) | MFU "
            "| peak RSS, model process (MiB) | peak PSS, all processes (MiB) | other processes' CPU |")
    if cuda:
        head += " GPU util % (mean) | peak GPU mem (MiB) |"
    lines = [head, "|" + "---|" * 2 + "---:|" * (head.count("|") - 3)]
    for r in sorted_runs(results):
        name = NAMES.get(r["section"], r["section"]) + (f" [{r['decode_mode']}]" if r.get("mode_label") else "")
        if not r.get("ok"):
            err = str(r.get("error"))
            lines.append(f"| {name} | {variant(r)} | {err if err.startswith('skipped') else 'FAILED: ' + err[:160]} |")
            continue
        gf = r.get("flops_per_image", 0) / 1e9
        steady = steady_of(r)
        tf = steady * r.get("flops_per_image", 0) / 1e12
        mfu = f"{100 * tf / peak:.1f}%" if peak and gf else ""
        cells = [name, variant(r), r["images"], r["seconds"], f"**{r['img_s']}**", steady,
                 f"{gf:.3g}" if gf else "", f"{tf:.3g}" if gf else "", mfu, model_proc_rss(r) or "",
                 r.get("memory_mib", {}).get("pss_total", ""), f"{100 * r.get('cpu_util_foreign', 0):.0f}%"]
        if cuda:
            cells += [r.get("gpu_util_mean", ""), r.get("cuda_peak_alloc_mib") or r.get("gpu_mem_peak_above_idle_mib", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def _detail(r: dict[str, Any]) -> str | None:
    """The run's own line under "Details" (None for sections without one)."""
    v, sec = variant(r), r["section"]
    if sec == "limit":
        bits = [f"`Runner.run` img/s by torch threads {r.get('img_s_by_threads')} (limit = the best, "
                f"{r.get('best_threads')} thread(s)); bare `model.encode` on device tensors {r.get('bare_img_s')} img/s",
                f"{r.get('dtype')} on {r.get('device')}, matmul ceiling {r.get('matmul_tflops')} TFLOP/s "
                f"({r.get('matmul_dtype')}, {r.get('torch_threads')} threads)"]
        return f"- (a) {v}: " + "; ".join(bits)
    if sec == "decode":
        return (f"- (b) {v}, {r['decode_threads']} {r.get('decode_mode') or 'threads'}; per image on one thread: read tar "
                f"{r['read_tar_ms']} ms, `decode_image` {r['decode_image_ms']} ms (without draft "
                f"{r['decode_image_nodraft_ms']} ms), naive PIL full decode + resize {r['naive_pil_ms']} ms")
    if sec == "inproc" and "share_consume" in r:
        return (f"- (c') {v}: of the wall time, the model thread ran `Runner.run` "
                f"{100 * r['share_model']:.0f}% and waited on its queues "
                f"{100 * r['share_model_thread_idle']:.0f}%; the sink (hash, columns, Parquet) took "
                f"{100 * r['share_consume']:.0f}% ({'in the model thread' if r['consume_in_model_thread'] else 'on its own thread'}), "
                f"of which `add_rows` {100 * r['share_write']:.0f}% (model load {r['model_load_s']} s, not timed)")
    if sec in ("pipeline", "raydata"):
        m = r["memory_mib"]
        return (f"- ({'c' if sec == 'pipeline' else 'e'}) {v}: local Ray start {r.get('ray_start_s')} s "
                f"(not timed); model-actor process peak RSS {m.get('max_single_rss_model_worker')} MiB; Ray "
                f"system processes peak PSS {m.get('pss_ray_system')} MiB"
                + (f"; worker busy-time rate {r.get('worker_busy_img_s')} img/s over {r.get('shards')} shards"
                   if sec == "pipeline" else ""))
    if sec == "naive":
        return (f"- (d) {v}: {r['loader_workers']} DataLoader workers; first batch after "
                f"{r['first_batch_s']} s; model {100 * r['share_model']:.0f}% of wall; final pandas write "
                f"{r['write_s']} s; loader worker processes peak PSS {r['memory_mib'].get('pss_children')} MiB")
    return None


def _ratio_table(results: dict[str, Any]) -> list[str]:
    rat = ["| model | (c) img/s wall / steady | (c)/(a) vs limit | (c)/(b) vs decode alone | (c)/(d) vs naive "
           "| (c)/(e) vs Ray Data |", "|---|---:|---:|---:|---:|---:|"]
    for row in ratios(results):
        def cell(k: str, row: dict[str, Any] = row) -> str:
            return f"{row[k][0]} / {row[k][1]}" if k in row else ""
        rat.append(f"| {row['variant']} | {row['wall']} / {row['steady']} | {cell('limit')} | {cell('decode')} | "
                   f"{cell('naive')} | {cell('raydata')} |")
    return rat


def _scaling_table(sc: dict[str, Any]) -> list[str]:
    out = ["", f"### Scaling ({sc['preset']}, pipeline end to end)", "",
           "| images | shards | wall s | img/s (wall) | img/s (steady) | peak RSS, worker (MiB) "
           "| peak PSS, all (MiB) | other processes' CPU |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sc["runs"]:
        if r.get("ok"):
            m = r["memory_mib"]
            out.append(f"| {r['images']} | {r['shards']} | {r['seconds']} | {r['img_s']} | {r.get('steady_img_s')} | "
                       f"{m.get('max_single_rss_model_worker')} | {m.get('pss_total')} | "
                       f"{100 * r.get('cpu_util_foreign', 0):.0f}% |")
        else:
            out.append(f"| {r['images_planned']} | | FAILED: {r.get('error')} | | | | | |")
    if "time_ratio" in sc:
        out += ["", f"{sc['factor']}x the images took {sc['time_ratio']}x the wall time (fixed start-up "
                f"included; marginal rate {sc['marginal_img_s']} img/s); worker peak RSS ratio "
                f"{sc.get('worker_peak_rss_ratio')}; in the {sc['factor']}x run the worker's RSS peaked at "
                f"{sc.get('worker_rss_first_half_max')} MiB in the first half of the run and "
                f"{sc.get('worker_rss_second_half_max')} MiB in the second half."]
    return out


def _footer(meta: dict[str, Any]) -> list[str]:
    hw, code = meta["hardware"], meta.get("code", {})
    return ["", f"Hardware: {hw.get('Model name', '?')}, {hw.get('cpu_count')} CPUs, {hw.get('ram_gib')} GiB RAM"
            + (f", {hw.get('nvidia_smi')}" if hw.get("nvidia_smi") else "")
            + f"; torch {hw.get('torch')}, ray {hw.get('ray')}. Date {meta['date']}. "
            f"MFU peak: {meta.get('peak_tflops')} TFLOP/s ({meta.get('peak_source')}).",
            f"Command: `{meta['command']}`; code: commit {code.get('commit')}"
            + (f" with uncommitted changes in {', '.join(code['uncommitted'])}" if code.get("uncommitted") else "")
            + "."]


def markdown(results: dict[str, Any]) -> str:
    """Throughput and memory, ratios, details, scaling, hardware and command, as markdown."""
    details = [d for r in sorted_runs(results) if r.get("ok") and (d := _detail(r)) is not None]
    out = ["### Throughput and memory", "", *_throughput_table(results), "", "### Ratios (wall / steady)", "",
           *_ratio_table(results), "", "### Details", "", *details]
    if results.get("scaling"):
        out += _scaling_table(results["scaling"])
    out += _footer(results["meta"])
    return "\n".join(out) + "\n"


# =============================================================================== plot
def _bars(axes: Any, results: dict[str, Any], variants: list[str], width: float) -> None:
    """Throughput (wall bars, steady ticks) and peak memory (model process RSS, all PSS) per section."""
    best = fastest(results)
    for vi, v in enumerate(variants):
        got = {sec: r for (var, sec), r in best.items() if var == v}
        xs = [i + vi * width for i, s in enumerate(PLOT_ORDER) if s in got]
        ys = [got[s]["img_s"] for s in PLOT_ORDER if s in got]
        bars = axes[0].bar(xs, ys, width, label=v)
        axes[0].bar_label(bars, fmt="%.0f", fontsize=7)
        axes[0].scatter(xs, [steady_of(got[s]) for s in PLOT_ORDER if s in got], marker="_", s=120, color="black",
                        label="steady state (after the first output)" if vi == 0 else None, zorder=3)
        mem = [(model_proc_rss(got[s]) or 0) for s in PLOT_ORDER if s in got]
        tot = [got[s].get("memory_mib", {}).get("pss_total", 0) for s in PLOT_ORDER if s in got]
        colour = bars.patches[0].get_facecolor() if bars.patches else None
        axes[1].bar(xs, tot, width, alpha=0.35, color=colour)
        axes[1].bar(xs, mem, width, label=f"{v}: model process RSS (solid) / all PSS (light)", color=colour)
    for ax, title, ylab in ((axes[0], "throughput (bars: wall clock incl. start-up;\nfaster decode mode where both ran)",
                             "images / s (log)"), (axes[1], "peak memory", "MiB")):
        ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(PLOT_ORDER))])
        ax.set_xticklabels([PLOT_LABELS[s] for s in PLOT_ORDER], fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylab)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")


def _scaling_plot(ax: Any, sc: dict[str, Any]) -> None:
    """The worker's RSS over time in each scaling run."""
    for r in sc["runs"]:
        if r.get("ok") and r.get("worker_rss_series"):
            t, v = zip(*r["worker_rss_series"], strict=True)
            ax.plot(t, v, label=f"{r['images']} images: {r['seconds']:.0f} s, {r['img_s']:.0f} img/s")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("worker RSS (MiB)")
    ax.set_ylim(bottom=0)
    ttl = f"scaling: pipeline worker memory, {sc['preset']}"
    if "time_ratio" in sc:
        ttl += f"\n{sc['factor']}x images -> {sc['time_ratio']}x time (marginal {sc['marginal_img_s']:.0f} img/s)"
    ax.set_title(ttl, fontsize=9)
    if ax.get_lines():
        ax.legend(fontsize=7, loc="lower right")


def plot(results: dict[str, Any], path: str) -> None:
    """The PNG: throughput, memory and (with a scaling section) the worker's RSS over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(variant(r) for r in results["runs"]))
    sc = results.get("scaling")
    fig, axes = plt.subplots(1, 3 if sc else 2, figsize=(17 if sc else 12, 4.8))
    _bars(axes, results, variants, 0.8 / max(1, len(variants)))
    if sc:
        _scaling_plot(axes[2], sc)
    hw = results["meta"]["hardware"]
    fig.suptitle(f"WinTok pipeline benchmark - {hw.get('Model name', '?')}, {hw.get('cpu_count')} CPUs"
                 + (f", {hw.get('gpu')}" if hw.get("gpu") else "") + f" - {results['meta']['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================== files
def write_outputs(results: dict[str, Any], json_path: str | None, md_path: str, png_path: str,
                  quiet: bool = False) -> None:
    """results.json (unless None), the markdown and, unless `quiet`, the plot and the table on stdout."""
    for target in filter(None, (json_path, md_path, png_path)):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results)
    Path(md_path).write_text(md)
    if quiet:
        return
    wrote = ", ".join(filter(None, (json_path, md_path)))
    try:
        plot(results, png_path)
        log(f"wrote {wrote}, {png_path}")
    except ImportError:
        log(f"wrote {wrote} (no matplotlib: no plot; pip install matplotlib)")
    print(md)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks report RESULTS.json`: redraw the markdown and the plot from a results file."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks report", description=main.__doc__)
    ap.add_argument("results", help="a results JSON written by a benchmark run (e.g. benchmarks/results.json)")
    ap.add_argument("--markdown", default=str(HERE / "_work" / "results.md"), help="where the markdown table goes")
    ap.add_argument("--png", default=str(HERE / "_work" / "results.png"), help="where the plot goes")
    args = ap.parse_args(argv)
    write_outputs(json.loads(Path(args.results).read_text()), None, args.markdown, args.png)
    return 0
