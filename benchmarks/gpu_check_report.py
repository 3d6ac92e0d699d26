"""The report of ``benchmarks/gpu_check.sh``: ``<stem>.json`` and ``<stem>.md`` from its raw files.

Inputs (all optional: a step that failed or ran out of time leaves some out, and
the report of a partial run is still worth committing):

* ``steps.tsv``: one line per step (name, verdict, exit status, seconds, command, budget);
* ``tests.xml``: pytest's JUnit XML of the CUDA/Triton tests;
* ``benchmarks.jsonl``: one pytest-benchmark entry per line, appended as each benchmark finished;
* ``bench-cli.json``, ``bench-compile.json``: ``resnet-fast bench --json`` (backends; torch.compile).

Usage::

    python benchmarks/gpu_check_report.py --raw DIR/raw --stem DIR/2026-12-01-nvidia-h200 [--print]

``--print`` writes the Markdown to standard output, cut to ``--print-limit`` characters
(the GPU machine's reply keeps only the last 12,000 characters of a run's output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import xml.etree.ElementTree as ElementTree
from typing import Any, Optional

import torch


def read_steps(path: str) -> list[dict[str, Any]]:
    steps = []
    if os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                fields = (line.rstrip("\n").split("\t") + [""] * 6)[:6]
                name, verdict, status, seconds, command, budget = fields
                steps.append({"step": name, "verdict": verdict, "exit": int(status or 0),
                              "seconds": float(seconds or 0), "budget_s": float(budget or 0), "command": command})
    return steps


def read_benchmark_lines(path: str) -> list[dict[str, Any]]:
    """The entries of a JSON-lines file; a line cut off by a killed run is skipped, not fatal."""
    entries = []
    if os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    continue
    return entries


def read_tests(path: str) -> Optional[dict[str, Any]]:
    """Counts and failures from pytest's JUnit XML, or None when the tests step wrote none."""
    if not os.path.exists(path):
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        return {"error": f"unreadable {os.path.basename(path)}: {error}"}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, slowest = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        slowest.append((float(case.get("time") or 0), name))
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            counts["failed" if problem.tag == "failure" else "errors"] += 1
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failures.append({"test": name, "message": message[0][:300] if message else ""})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    slowest.sort(reverse=True)
    return {**counts, "failures": failures, "slowest": [{"test": n, "seconds": s} for s, n in slowest[:10]]}


def benchmark_rows(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """pytest-benchmark entries as ``{group: [row, ...]}`` with provider, ms, images/s, TFLOP/s, speed-up vs stock."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        extra = entry.get("extra_info", {})
        provider = extra.get("provider") or (entry.get("params") or {}).get("provider") or entry.get("name")
        groups.setdefault(entry.get("group") or "ungrouped", []).append({
            "provider": provider,
            "ms": 1e3 * entry["stats"]["median"],
            "images_per_s": extra.get("images_per_s"),
            "tflops": extra.get("tflops"),
            "first_output_s": extra.get("first_output_s"),
            "max_abs_error": extra.get("max_abs_error"),
        })
    for rows in groups.values():
        stock = next((r for r in rows if r["provider"] in ("stock", "stock-nchw")), None)
        for row in rows:
            row["speedup_vs_stock"] = stock["ms"] / row["ms"] if stock and row["ms"] else None
    return groups


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _bench_table(cli: dict[str, Any]) -> list[str]:
    lines = ["", f"## `resnet-fast bench`: {cli['model']} {cli['mode']}, batch {cli['batch_size']}, "
                 f"{cli['image_size']}px, {cli['dtype']}", "",
             f"FastResNet vs torchvision: max abs error {cli['max_abs_error']:.2e}, "
             f"relative {cli['relative_error']:.2e}", "",
             "| provider | ms/batch | images/s | vs eager | first output (s) |", "| --- | --- | --- | --- | --- |"]
    for row in cli["results"]:
        if row["status"] != "ok":
            lines.append(f"| {row['label']} | {row['status']}: {row['note']} | | | |")
            continue
        lines.append(f"| {row['label']} | {row['ms_per_batch']:.2f} | {row['images_per_s']:.1f} | "
                     f"{_fmt(row['speedup_vs_eager'], '.2f')}x | {_fmt(row['first_output_s'], '.1f')} |")
    return lines


def _read_json(path: str) -> dict[str, Any]:
    """A bench command's JSON, or {} when the step wrote none (failed, or cut off by its budget)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def markdown(summary: dict[str, Any]) -> str:
    machine = summary["machine"]
    lines = [f"# GPU check {summary['date'][:10]}: {machine['gpu'] or machine['cpu']}", "",
             f"torch {machine['torch']} (CUDA {machine['cuda']}), torchvision {machine['torchvision']}, "
             f"python {machine['python']}, resnet_fast {machine['resnet_fast']}, "
             f"extension: {machine['extension']}", "",
             "| step | result | seconds | budget |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['step']} | {s['verdict']} (exit {s['exit']}) | {s['seconds']:.0f} | {s['budget_s']:.0f} |"
              for s in summary["steps"]]
    tests = summary["tests"]
    if tests is not None:
        lines += ["", "## CUDA and Triton tests", ""]
        if "error" in tests:
            lines.append(tests["error"])
        else:
            lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                         f"{tests['skipped']} skipped")
            lines += [f"- FAILED `{f['test']}`: {f['message']}" for f in tests["failures"][:40]]
            if len(tests["failures"]) > 40:
                lines.append(f"- ... and {len(tests['failures']) - 40} more (tests.xml)")
            lines += ["", "slowest: " + ", ".join(f"{t['test'].split('::')[-1]} {t['seconds']:.0f} s"
                                                  for t in tests["slowest"][:5])]
    for cli in (summary["bench_cli"], summary["bench_compile"]):
        if cli:
            lines += _bench_table(cli)
    groups = summary["benchmarks"]
    if groups:
        lines += ["", "## pytest-benchmark (median)", "",
                  "| group | provider | ms | images/s | TFLOP/s | vs stock |", "| --- | --- | --- | --- | --- | --- |"]
        for group, rows in groups.items():
            for row in rows:
                lines.append(f"| {group} | {row['provider']} | {row['ms']:.3f} | {_fmt(row['images_per_s'], '.1f')} | "
                             f"{_fmt(row['tflops'], '.2f')} | {_fmt(row['speedup_vs_stock'], '.2f')}x |")
    else:
        lines += ["", "(no pytest-benchmark results: see the benchmark steps in logs.txt)"]
    return "\n".join(lines) + "\n"


def write_report(raw_dir: str, stem: str) -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` from the raw files in ``raw_dir``; returns the Markdown."""
    from resnet_fast.bench import machine_info

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    summary = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "steps": read_steps(os.path.join(raw_dir, "steps.tsv")),
        "tests": read_tests(os.path.join(raw_dir, "tests.xml")),
        "bench_cli": _read_json(os.path.join(raw_dir, "bench-cli.json")),
        "bench_compile": _read_json(os.path.join(raw_dir, "bench-compile.json")),
        "benchmarks": benchmark_rows(read_benchmark_lines(os.path.join(raw_dir, "benchmarks.jsonl"))),
    }
    text = markdown(summary)
    for suffix, content in ((".json", json.dumps(summary, indent=2, default=str)), (".md", text)):
        temporary = f"{stem}{suffix}.tmp"
        with open(temporary, "w") as handle:
            handle.write(content)
        os.replace(temporary, stem + suffix)  # never a half-written report
    return text


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", required=True, help="folder of the raw files (steps.tsv, tests.xml, ...)")
    parser.add_argument("--stem", required=True, help="path of the report without suffix")
    parser.add_argument("--print", action="store_true", help="also print the Markdown report")
    parser.add_argument("--print-limit", type=int, default=9000, help="characters printed at most (default 9000)")
    args = parser.parse_args(argv)
    text = write_report(args.raw, args.stem)
    if args.print:
        if len(text) > args.print_limit:
            text = text[:args.print_limit] + f"\n... (cut at {args.print_limit} characters; all of it in {args.stem}.md)\n"
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
