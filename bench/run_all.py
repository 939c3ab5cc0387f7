"""`make bench`: run every benchmark, then write bench/RESULTS.md from their bench/out/*.json.

Each benchmark measures two ways in the same run and reports the ratio; this file only
formats what they saved. Run from the project root: `.venv/bin/python -m bench.run_all`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.common import OUT, ROOT, machine

BENCHES = (
    "pack",
    "generic_pack",
    "cgn_overhead",
    "aggregate",
    "sweep_overhead",
    "cli_startup",
    "cli_exit",
    "retry_delay",
)
TARGETS = {
    "pack": ">= 6x per-seed throughput at <= 4 filters; auto never slower per seed; >= 40% of matmul peak",
    "generic_pack": "generic packs >= 0.8x grouped packs per seed; >= 3x one seed at 1 filter, batch 32",
    "cgn_overhead": "RandomOut <= 3% per step; RePr <= 3% per epoch",
    "aggregate": "10,000 trial results aggregated in <= 10 s",
    "sweep_overhead": "Ray Tune + MLflow <= 10% over a plain loop on the demo sweep",
    "cli_startup": "`lottery --help` and a one-line spec error each under 1.5 s",
    "cli_exit": "a command that loaded torch and MLflow ends >= 1 s sooner than after the full teardown",
    "retry_delay": "a killed worker's trial (a lone seed or a pack) retried within 10 s (median)",
}


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def pack_section(d: dict) -> list[str]:
    sizes = list(d["rows"][0]["packs"])
    lines = [
        f"Matmul peak measured: {d['matmul_peak_gflops']:.1f} GFLOP/s ({d['device']}), the best of "
        f"{len(d.get('matmul_peaks_gflops', [0]))} measurements taken through the run.",
        "",
        "| filters | hidden FC | batch | one seed (seed-steps/s) | % of peak | "
        + " | ".join(f"pack {k}" for k in sizes)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(sizes),
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['filters']} | {r['hidden_fc']} | {r['batch']} | {r['single_seed_steps_per_s']:.0f} | "
            f"{100 * r['single_peak_fraction']:.0f}% | "
            + " | ".join(f"{r['packs'][k]['ratio']:.2f}x" for k in sizes)
            + " |"
        )
    large = d.get("large_steps", [])
    if large:
        lines += [
            "",
            "Big steps, one thread as a trial runs (no hidden FC); the last column is the pack "
            "`pack_size: auto` picks and its ratio:",
            "",
            "| filters | batch | pack 8 | pack 32 | auto |",
            "|---|---|---|---|---|",
        ]
        for r in large:
            ratios = {int(k): v for k, v in r["ratios"].items()}
            lines.append(
                f"| {r['filters']} | {r['batch']} | {ratios[8]:.2f}x | {ratios[32]:.2f}x | "
                f"{r['auto']} ({ratios[r['auto']]:.2f}x) |"
            )
    return lines


def generic_pack_section(d: dict) -> list[str]:
    lines = [
        "| net | filters | pack | one seed | grouped | generic | generic/grouped | generic/one seed | "
        "grouped/one seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in d["rows"]:
        step = row["seed_steps_per_s"]["step"]
        for k, pack in row["packs"].items():
            grouped = step.get(f"grouped{k}")
            cells = [
                row["net"],
                str(row.get("filters", "-")),
                k,
                f"{step['single']:.0f}",
                f"{grouped:.0f}" if grouped else "-",
                f"{step[f'generic{k}']:.0f}",
                f"**{pack['generic_vs_grouped']['step']:.2f}x**" if grouped else "-",
                f"**{pack['generic_vs_single']['step']:.2f}x**",
                f"{pack['grouped_vs_single']['step']:.2f}x" if grouped else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return [
        f"Seed-steps/s, batch 32, one thread; crater_cnn with the {d['rows'][0].get('hidden_fc', 500)}-wide "
        "hidden FC; the ways take turns step by step and each way's median of "
        f"{d['steps']} steps is compared (bench/generic_pack.py).",
        "",
        *lines,
    ]


def overhead_section(d: dict) -> list[str]:
    lines = [
        "| model | images/epoch | batch | baseline s/epoch | randomout | repr |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        e = r["epoch_s"]
        lines.append(
            f"| {r['model']} | {r['train_images']} | {r['batch']} | {e['baseline']:.3f} | "
            f"{e['randomout']:.3f} ({pct(r['randomout_overhead'])}) | "
            f"{e['repr']:.3f} ({pct(r['repr_overhead'])}) |"
        )
    return lines


def aggregate_section(d: dict) -> list[str]:
    return [
        f"{d['trials']} synthetic trials: ours {d['ours_s']:.2f} s (load {d['load_trials_s']:.2f} s + "
        f"summarise {d['summarise_s']:.2f} s) vs naive per-file pandas {d['naive_s']:.1f} s: "
        f"**{d['ratio']:.1f}x**. Per-epoch tables: {d['load_epochs_s']:.1f} s "
        f"vs {d['naive_epochs_s']:.1f} s.",
    ]


def sweep_section(d: dict) -> list[str]:
    return [
        f"Spec `{d['spec']}` ({d['trials']} trials in {d['units']} units): plain loop {d['loop_s']:.1f} s, "
        f"`lottery sweep` {d['sweep_s']:.1f} s: **{d['ratio']:.2f}x** (summed per-seed training time, "
        f"a pack's counted once per seed: {d['loop_train_s']:.1f} s vs {d['sweep_train_s']:.1f} s).",
    ]


def startup_section(d: dict) -> list[str]:
    lines = [
        "| command | CLI as it is (lazy imports) | torch imported at load (eager) | eager / lazy |",
        "|---|---|---|---|",
    ]
    names = {"help": "`lottery --help`", "spec_error": "a one-line spec error"}
    for case, r in d["rows"].items():
        lines.append(f"| {names[case]} | {r['lazy_s']:.2f} s | {r['eager_s']:.2f} s | {r['ratio']:.2f}x |")
    return [*lines, "", f"Median of {d['repeat']} fresh processes each, interleaved."]


def exit_section(d: dict) -> list[str]:
    lines = ["| command | prompt exit | full teardown | teardown / prompt | saved |", "|---|---|---|---|---|"]
    for name in ("train", "sweep"):
        prompt, teardown = d[f"{name}_prompt_s"], d[f"{name}_teardown_s"]
        label = "`lottery train` (one tiny trial)" if name == "train" else "`lottery sweep --dry-run`"
        ratio, saved = d[f"{name}_ratio"], teardown - prompt
        lines.append(f"| {label} | {prompt:.2f} s | {teardown:.2f} s | {ratio:.2f}x | {saved:.2f} s |")
    return [*lines, "", f"Median of {d['repeat']} fresh processes each, interleaved."]


def retry_section(d: dict) -> list[str]:
    lines = ["| units | actor reuse | retry delay (s) | median |", "|---|---|---|---|"]
    for scenario, sides in d["runs"].items():
        for side, found in sides.items():
            delays = ", ".join(f"{r['delay_s']:.1f}" for r in found)
            median = d["median"][scenario][side]["delay_s"]
            lines.append(f"| {scenario} | {side} | {delays} | **{median:.1f}** |")
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in d["delay_ratio_reuse_over_fresh"].items())
    return [
        "Worker SIGKILLed mid-trial (a lone seed's, or a 16-seed pack's), time to the retry's start:",
        "",
        *lines,
        "",
        *([f"Reuse / fresh (medians): {ratios}."] if ratios else []),
    ]


SECTIONS = {
    "pack": pack_section,
    "generic_pack": generic_pack_section,
    "cgn_overhead": overhead_section,
    "aggregate": aggregate_section,
    "sweep_overhead": sweep_section,
    "cli_startup": startup_section,
    "cli_exit": exit_section,
    "retry_delay": retry_section,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", nargs="*", default=list(BENCHES))
    args = parser.parse_args()
    for name in args.only:
        extra = ["--device", args.device] if name in ("pack", "cgn_overhead") else []
        print(f"== bench/{name}.py", flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], cwd=ROOT, check=True)
        print(f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {machine()}. Written by `make bench` (bench/run_all.py) on {time.strftime('%Y-%m-%d')}.",
        "Each benchmark times two ways in one run; on this shared 2-core machine absolute times swing",
        "by 20-40 %, so read the ratios. No GPU here: `--device cuda` runs the same comparisons on one.",
        "",
    ]
    for name in BENCHES:
        path = OUT / f"{name}.json"
        lines += [f"## {name}", "", f"Target: {TARGETS[name]}.", ""]
        if path.exists():
            lines += SECTIONS[name](json.loads(path.read_text()))
        else:
            lines.append("Not run.")
        lines.append("")
    (ROOT / "bench" / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {ROOT / 'bench' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
