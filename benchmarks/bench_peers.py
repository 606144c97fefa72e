"""Our EAP (and ACDC) against auto-circuit's, on the same model and the same prompts.

    python benchmarks/bench_peers.py [--model gpt2-random|gpt2-tiny-random|smollm2|both] [--prompts 16]
                                     [--batch 8] [--repeats 1] [--acdc] [--acdc-prompts 4]
                                     [--acdc-tau 1e-5] [--acdc-sample-per-layer 10] [--no-eap]
                                     [--workdir DIR]

1. Sets up the peers' own virtual environment (``<user cache>/causal-circuits/peers/venv``, outside the repository; torch 2.13.0
   first, then auto-circuit 1.0.1, TransformerLens 2.18.0, pyarrow 21.0.0, attrs), once.
2. Writes the model folders (a seeded random-weight GPT-2 - ``gpt2-random``: 6 layers, 8 heads, d=256;
   ``gpt2-tiny-random``: 3 layers, 4 heads, d=128 - or the cached SmolLM2-135M) and one data
   file of equal-length IOI prompts (same clean / corrupted token ids, answers and wrong answers for
   both sides; the metric is the logit difference averaged over prompts, read at the last position).
3. Runs each side in a fresh child process - ours in this interpreter, auto-circuit in the peers
   venv - timing only the scoring call and reading the child's peak RSS (``ru_maxrss``). Each side
   writes its scores keyed by our edge ids (``benchmarks/peers/scorefile.py``).
4. Compares: edges each graph lacks, the fitted factor between the scores (auto-circuit's are
   ``-n_batches`` x ours by construction), max relative difference after alignment, Pearson /
   Spearman, top-100 overlap; time and peak-RSS ratios theirs / ours.
5. With ``--acdc``: ACDC at one threshold with the KL metric on one batch
   of ``--acdc-prompts`` prompts on both sides (auto-circuit's ACDC uses the first batch of its loader
   only, and runs one forward pass per edge: with one thread about 8 s on ``gpt2-tiny-random`` with 4
   prompts, 3 minutes on ``gpt2-random`` with 2 prompts): time ratio and circuit overlap. auto-circuit visits
   the edges of one layer in the order of a Python set, which changes from process to process; its
   child records that order, and our ACDC is run once more in exactly that order
   (``benchmarks/peers/replay.py``, one evaluation per edge) to show whether the circuits differ
   only by the visiting order.
   On SmolLM2 auto-circuit's whole search (123k edges, one forward each) would take about two days, so
   its child visits only ``--acdc-sample-per-layer`` edges per layer (every mask stays full size) and
   its time is the sampled call plus, per unvisited edge, the mean trial forward of its layer. On
   the GPT-2 models the same estimate is also run and set against the measured whole search
   (``theirs_sampled_estimate_check``; on ``gpt2-random`` within 5 %). Ours runs the whole search. Time ratios are also given
   in CPU seconds (``cpu_time``), which other jobs on the machine disturb less than wall time.

Results are merged into ``benchmarks/results/peers.json`` (one entry per model) and printed.
With ``--repeats n`` every child runs n times, alternating sides; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import compare, data, venv
from benchmarks.peers.scorefile import read_scores

RESULTS = ROOT / "benchmarks" / "results" / "peers.json"
PEERS_DIR = ROOT / "benchmarks" / "peers"
SIDES = ("ours", "auto-circuit")
CARRIED = ("date", "prompts", "batch", "repeats", "data", "data_file", "load_average_at_start")  # a run's settings


def default_workdir() -> Path:
    """Models, data and score files live under the user cache (``.../causal-circuits/peers``)."""
    from graphs.alias_cache import cache_dir

    return cache_dir() / "peers"


def run_side(side: str, peers_python: Path, args: list[str]) -> dict[str, Any]:
    """One child process of ``side``; returns the JSON line it printed last."""
    if side == "ours":
        cmd = [sys.executable, str(PEERS_DIR / "run_ours.py"), *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
    else:
        cmd = [str(peers_python), str(PEERS_DIR / "run_autocircuit.py"), *args]
        env = {**os.environ, "PYTHONPATH": ""}
    start = time.perf_counter()
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{side} child failed ({' '.join(cmd)}):\n{out.stderr[-4000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["process_seconds"] = time.perf_counter() - start
    return record


def run_pair(method: str, folder: Path, data_file: Path, batch: int, repeats: int, peers_python: Path,
             scores_dir: Path, stem: str, tau: float | None = None,
             reference: Path | None = None, sample_per_layer: int = 0) -> dict[str, dict[str, Any]]:
    """Both sides ``repeats`` times, alternating; median seconds and peak RSS per side. With
    ``sample_per_layer`` auto-circuit's ACDC visits only that many edges per layer and its time is the
    estimate for the whole search (``run_autocircuit.sample_edges``)."""
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    for _ in range(repeats):
        for side in SIDES:
            out = scores_dir / f"{stem}-{method}-{side}.safetensors"
            args = ["--folder", str(folder), "--data", str(data_file), "--out", str(out), "--method", method,
                    "--batch", str(batch)]
            if tau is not None:
                args += ["--tau", repr(tau)]
            if side == "ours" and method == "acdc":
                args += ["--metric", "kl"]
            if side != "ours" and reference is not None:
                args += ["--reference", str(reference)]
            if side != "ours" and sample_per_layer:
                args += ["--sample-per-layer", str(sample_per_layer)]
            print(f"  {method} {side} ...", end=" ", flush=True)
            record = run_side(side, peers_python, args)
            record["scores_file"] = None if side != "ours" and sample_per_layer else str(out)  # a sample writes none
            print(f"{record['seconds']:.2f} s, peak RSS {record['peak_rss_mb']:.0f} MB", flush=True)
            runs[side].append(record)
    summary: dict[str, dict[str, Any]] = {}
    for side, records in runs.items():
        summary[side] = {
            **records[-1],
            "seconds": statistics.median(r["seconds"] for r in records),
            "seconds_all": [r["seconds"] for r in records],
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in records),
            "kept_all": [r.get("kept") for r in records],
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in records),
            "rss_before_call_mb": statistics.median(r["rss_before_call_mb"] for r in records),
        }
    return summary


def ratios(sides: dict[str, dict[str, Any]]) -> dict[str, float]:
    """theirs / ours for time, whole-process peak RSS and the RSS added during the call."""
    o, t = sides["ours"], sides["auto-circuit"]
    added = lambda r: max(r["peak_rss_mb"] - r["rss_before_call_mb"], 1e-9)
    return {
        "time": t["seconds"] / o["seconds"],
        "cpu_time": t["cpu_seconds"] / o["cpu_seconds"],
        "peak_rss": t["peak_rss_mb"] / o["peak_rss_mb"],
        "rss_added_by_call": added(t) / added(o),
    }


def bench_model(name: str, args: argparse.Namespace, peers_python: Path,
                previous: dict[str, Any]) -> dict[str, Any]:
    """Everything for one model: data, EAP on both sides (and ACDC). ``previous`` is the model's last
    record, whose EAP or ACDC entry is kept when this run skips it."""
    workdir: Path = args.workdir
    folder = data.model_folder(name, workdir)
    data_file = workdir / "data" / f"{name}-ioi-n{args.prompts}-s{args.seed}.safetensors"
    info = data.write_ioi_data(folder, args.prompts, data_file, seed=args.seed)
    n_batches = -(-args.prompts // args.batch)
    print(f"{name}: {data.MODELS[name]}\n  {args.prompts} IOI prompts x {info['tokens_per_prompt']} tokens,"
          f" batches of {args.batch}", flush=True)
    record: dict[str, Any] = {
        "model": data.MODELS[name], "folder": str(folder), "data": info, "data_file": str(data_file),
        "prompts": args.prompts, "batch": args.batch, "repeats": args.repeats,
        "metric": "logit difference (answer - wrong), mean over prompts, read at the last position",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_at_start": os.getloadavg(),
    }
    scores_dir = workdir / "scores"
    if args.no_eap:
        if "eap" in previous:  # kept from an earlier run: with that run's date and settings
            record["eap"] = {**{k: previous.get(k) for k in CARRIED}, **previous["eap"]}
    else:
        reference = data.write_reference_logits(folder, data_file,
                                                workdir / "data" / f"{name}-reference-logits.safetensors")
        eap = run_pair("eap", folder, data_file, args.batch, args.repeats, peers_python, scores_dir, name,
                       reference=reference)
        ours, _, _ = read_scores(Path(eap["ours"]["scores_file"]))
        theirs, _, _ = read_scores(Path(eap["auto-circuit"]["scores_file"]))
        record["eap"] = {"runs": eap, "agreement": compare.eap_agreement(ours, theirs, n_batches),
                         "ratios": ratios(eap)}
        check = eap["auto-circuit"].get("tl_vs_project_hf_max_abs_logit_diff")
        if check is None or check > 1e-3:
            print(f"  WARNING: the TransformerLens model differs from the HF model by {check} in the logits",
                  flush=True)
    if args.acdc:
        record["acdc"] = bench_acdc(name, folder, args, peers_python, scores_dir)
    elif "acdc" in previous:
        record["acdc"] = {"date": previous.get("date"), **previous["acdc"]}
    return record


def bench_acdc(name: str, folder: Path, args: argparse.Namespace, peers_python: Path,
               scores_dir: Path) -> dict[str, Any]:
    """ACDC on both sides at one threshold with the KL metric.

    On the random GPT-2 models auto-circuit runs the whole search; the circuits are compared, and a
    sampled run of theirs checks the estimate used on SmolLM2. On SmolLM2 (123k edges, one forward
    each: about two days on this machine) auto-circuit visits ``--acdc-sample-per-layer`` edges per layer and its
    time is estimated from them; ours runs the whole search."""
    # auto-circuit's ACDC uses only the first batch: give both sides one batch of all its prompts
    acdc_file = args.workdir / "data" / f"{name}-ioi-n{args.acdc_prompts}-s{args.seed}.safetensors"
    acdc_info = data.write_ioi_data(folder, args.acdc_prompts, acdc_file, seed=args.seed)
    sampled_only = name not in data.GPT2_RANDOM_CONFIGS
    acdc = run_pair("acdc", folder, acdc_file, args.acdc_prompts, args.repeats, peers_python, scores_dir, name,
                    tau=args.acdc_tau, sample_per_layer=args.acdc_sample_per_layer if sampled_only else 0)
    record: dict[str, Any] = {
        "tau": args.acdc_tau, "metric": "KL(full || circuit), mean over prompts", "data": acdc_info,
        "prompts": args.acdc_prompts, "runs": acdc, "ratios": ratios(acdc),
        "theirs_sampled": sampled_only,
    }
    if sampled_only:
        return record
    ours_s, kept_o, _ = read_scores(Path(acdc["ours"]["scores_file"]))
    theirs_s, kept_t, _ = read_scores(Path(acdc["auto-circuit"]["scores_file"]))
    record["agreement"] = compare.circuit_agreement(ours_s, theirs_s, kept_o or set(), kept_t or set())
    record["ours_in_their_order"] = replay_their_order(folder, acdc_file, args, peers_python, Path(
        acdc["auto-circuit"]["scores_file"]), scores_dir / f"{name}-acdc-ours-in-their-order.safetensors")
    print("  acdc auto-circuit sampled (checks the estimate used on SmolLM2) ...", end=" ", flush=True)
    sampled = run_side("auto-circuit", peers_python, [
        "--folder", str(folder), "--data", str(acdc_file), "--out", str(scores_dir / f"{name}-acdc-sampled.safetensors"),
        "--method", "acdc", "--batch", str(args.acdc_prompts), "--tau", repr(args.acdc_tau),
        "--sample-per-layer", str(args.acdc_sample_per_layer)])
    full = acdc["auto-circuit"]
    record["theirs_sampled_estimate_check"] = {
        **sampled["sampled"],
        "full_search_cpu_seconds": full["cpu_seconds"], "full_search_seconds": full["seconds"],
        "estimated_over_measured_cpu": sampled["cpu_seconds"] / full["cpu_seconds"],
    }
    print(f"estimated {sampled['cpu_seconds']:.1f} CPU s, measured {full['cpu_seconds']:.1f} CPU s", flush=True)
    return record


def replay_their_order(folder: Path, data_file: Path, args: argparse.Namespace, peers_python: Path,
                       theirs_file: Path, out: Path) -> dict[str, Any]:
    """Our ACDC visiting the edges in the order auto-circuit's (last) run recorded, one evaluation
    per edge; its circuit against auto-circuit's."""
    print("  acdc ours in auto-circuit's edge order ...", end=" ", flush=True)
    record = run_side("ours", peers_python, [
        "--folder", str(folder), "--data", str(data_file), "--out", str(out), "--method", "acdc",
        "--batch", str(args.acdc_prompts), "--tau", repr(args.acdc_tau), "--metric", "kl", "--order", str(theirs_file)])
    print(f"{record['seconds']:.2f} s", flush=True)
    replay_s, kept_r, _ = read_scores(out)
    theirs_s, kept_t, _ = read_scores(theirs_file)
    return {"run": {**record, "scores_file": str(out)},
            "agreement_with_theirs": compare.circuit_agreement(replay_s, theirs_s, kept_r or set(), kept_t or set())}


def print_table(results: dict[str, Any], models: list[str]) -> None:
    """A compact table of agreement and ratios per model."""
    print()
    head = f"{'model':12s} {'edges o/t/common':>22s} {'factor':>8s} {'max rel diff':>12s} {'top100':>6s}" \
           f" {'t ours':>8s} {'t theirs':>8s} {'t ratio':>7s} {'RSS ours':>9s} {'RSS theirs':>10s} {'RSS ratio':>9s}"
    print("EAP: ours vs auto-circuit (ratios are theirs / ours; RSS = peak of the child process, MB)")
    print(head)
    for m in models:
        if "eap" not in results[m]:  # an ACDC-only run (--no-eap) of a model never benchmarked for EAP
            continue
        r = results[m]["eap"]
        a, o, t = r["agreement"], r["runs"]["ours"], r["runs"]["auto-circuit"]
        edges = f"{a['edges_ours']}/{a['edges_theirs']}/{a['edges_common']}"
        print(f"{m:12s} {edges:>22s} {a['fitted_factor_theirs_over_ours']:8.3f} {a['max_rel_diff']:12.2e}"
              f" {a['top100_overlap']:6.2f} {o['seconds']:8.2f} {t['seconds']:8.2f} {r['ratios']['time']:7.2f}"
              f" {o['peak_rss_mb']:9.0f} {t['peak_rss_mb']:10.0f} {r['ratios']['peak_rss']:9.2f}")
        print(f"{'':12s} TransformerLens vs HF logits: max |diff| {t.get('tl_vs_project_hf_max_abs_logit_diff')};"
              f" Pearson {a['pearson']:.6f}, Spearman {a['spearman']:.6f}")
    for m in models:
        if "acdc" in results[m]:
            r = results[m]["acdc"]
            o, t = r["runs"]["ours"], r["runs"]["auto-circuit"]
            if r.get("theirs_sampled"):
                est = t["sampled"]
                print(f"\nACDC on {m} (tau {r['tau']:g}, KL): ours kept {o['kept']} edges in {o['cpu_seconds']:.0f} CPU s;"
                      f" auto-circuit estimated from {est['sampled_edges']} of {est['total_edges']} edges:"
                      f" {t['cpu_seconds']:.0f} CPU s; ratio {r['ratios']['cpu_time']:.1f}")
                continue
            a = r["agreement"]
            print(f"\nACDC on {m} (tau {r['tau']:g}, KL): kept ours {a['kept_ours']}, theirs {a['kept_theirs']},"
                  f" both {a['kept_both']}, Jaccard {a['jaccard']:.3f}, precision {a['precision']:.3f},"
                  f" recall {a['recall']:.3f}; time ours {o['seconds']:.2f} s,"
                  f" theirs {t['seconds']:.2f} s, ratio {r['ratios']['time']:.2f};"
                  f" peak RSS ours {o['peak_rss_mb']:.0f} MB, theirs {t['peak_rss_mb']:.0f} MB,"
                  f" ratio {r['ratios']['peak_rss']:.2f}")
            if "ours_in_their_order" in r:
                a = r["ours_in_their_order"]["agreement_with_theirs"]
                print(f"  ours in auto-circuit's edge order: kept {a['kept_ours']}, theirs {a['kept_theirs']},"
                      f" both {a['kept_both']}, Jaccard {a['jaccard']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=(*data.MODELS, "both"), default="gpt2-random")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="child runs per side (medians are reported)")
    parser.add_argument("--acdc", action="store_true", help="also compare ACDC")
    parser.add_argument("--acdc-sample-per-layer", type=int, default=10,
                        help="edges per layer auto-circuit's ACDC visits to estimate its whole search"
                             " (SmolLM2; on the GPT-2 models, the estimate's check)")
    parser.add_argument("--no-eap", action="store_true", help="skip EAP (keep the model's last EAP record)")
    parser.add_argument("--acdc-prompts", type=int, default=4, help="prompts (one batch) for ACDC")
    parser.add_argument("--acdc-tau", type=float, default=1e-5,
                        help="ACDC threshold on KL (1e-4 keeps a circuit no better than the empty one)")
    parser.add_argument("--workdir", type=Path, default=None, help="models, data and score files")
    parser.add_argument("--setup-only", action="store_true", help="only create the peers venv")
    args = parser.parse_args()
    if args.prompts % args.batch:
        parser.error("--prompts must be a multiple of --batch (auto-circuit drops incomplete batches)")
    args.workdir = args.workdir or default_workdir()

    peers_python = venv.ensure_venv()
    if args.setup_only:
        print(f"peers venv ready: {peers_python}")
        return
    models = ["gpt2-random", "smollm2"] if args.model == "both" else [args.model]
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault("models", {})
    for name in models:
        results["models"][name] = bench_model(name, args, peers_python, results["models"].get(name, {}))
        results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True))
    print_table(results["models"], models)
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
