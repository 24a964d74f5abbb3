"""Run the benchmarks that apply to this machine and write bench/RESULTS.md.

Each bench/bench_*.py answers one question and prints its markdown table(s), comparing
lorafx with PEFT, PEFT + bitsandbytes and torchao where they install. This script runs the
ones meant for this machine (CPU scripts here, CUDA scripts where a GPU is), one process
each, and collects their output under a heading that names the machine and the date, with
each table's ratios as a bar chart (PNG) when matplotlib is installed.

    python bench/run_all.py                     # everything that applies; slow
    python bench/run_all.py --quick             # each script's smallest setting: a smoke run
    python bench/run_all.py --only nf4_quantize --only train_cpu
    python bench/run_all.py --list              # what would run, and why the rest would not

Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time

import torch

from lorafx.formats.files import write_atomically, write_text

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
TIMEOUT_S = 3600


@dataclasses.dataclass(frozen=True)
class Bench:
    """Where a script's numbers mean something, and its quickest meaningful arguments."""

    devices: tuple[str, ...]
    quick: tuple[str, ...] = ()


# Scripts measure peak memory through /proc RSS (CPU) or the CUDA allocator, so a CPU-memory
# question run on a GPU machine (or the reverse) would answer a different question.
SCRIPTS = {
    "bench_train_cpu": Bench(("cpu",), ("--rounds", "1", "--steps", "1", "--hidden", "128", "--layers", "2",
                                        "--vocab", "1000", "--seq", "64", "--cases", "steps", "depth", "--depths", "1", "2")),
    "bench_checkpointing": Bench(("cpu",), ("--rounds", "1", "--steps", "1", "--layers", "2")),
    "bench_load_nf4": Bench(("cpu",), ("--layers", "2", "--hidden", "512")),
    "bench_nf4_quantize": Bench(("cpu", "cuda"), ("--small",)),
    "bench_nf4_dequant_cpu": Bench(("cpu",), ("--small", "--rounds", "5")),
    "bench_nf4_lora_linear": Bench(("cuda",), ("--small",)),
    "bench_multi_adapter": Bench(("cpu", "cuda"), ("--small",)),
    "bench_init_error": Bench(("cpu",), ("--layers", "0")),
    "bench_unmerged_forward": Bench(("cpu",), ("--rounds", "2", "--hidden", "256", "--layers", "2")),
    "bench_transform": Bench(("cpu",), ("--rounds", "1", "--layers", "2", "8")),
}


def machine() -> tuple[str, str]:
    """(device kind, a name a reader recognizes: the GPU's, else the CPU model from /proc/cpuinfo)."""
    if torch.cuda.is_available():
        return "cuda", f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return "cpu", f"{cpu}, {os.cpu_count()} cores"


def discover() -> dict[str, str]:
    """bench_*.py in this folder, name → path."""
    paths = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    return {os.path.basename(p)[: -len(".py")]: p for p in paths}


def plan(scripts: dict[str, str], device: str, only: list[str]) -> tuple[list[str], dict[str, str]]:
    """The scripts to run and, for each one left out, the reason."""
    unknown = [name for name in only if f"bench_{name.removeprefix('bench_')}" not in scripts]
    if unknown:
        raise SystemExit(f"run_all: error: no bench script {unknown[0]!r}; there are: "
                         f"{', '.join(n.removeprefix('bench_') for n in scripts)}")
    wanted = {f"bench_{name.removeprefix('bench_')}" for name in only}
    run, skipped = [], {}
    for name in scripts:
        devices = SCRIPTS[name].devices if name in SCRIPTS else (device,)
        if wanted and name not in wanted:
            skipped[name] = "not asked for (--only)"
        elif device not in devices:
            skipped[name] = f"measures on {' or '.join(devices)}; this machine is {device}"
        else:
            run.append(name)
    return run, skipped


def run_script(name: str, path: str, quick: bool) -> tuple[str, float, int]:
    """The script's stdout (its markdown), seconds taken, exit status."""
    args = list(SCRIPTS[name].quick) if quick and name in SCRIPTS else []
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"**timed out after {TIMEOUT_S} s**\n", time.perf_counter() - start, 1
    text = out.stdout
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-15:])
        text += f"\n**exited with status {out.returncode}:**\n\n```\n{tail}\n```\n"
    return text, time.perf_counter() - start, out.returncode


def tables(markdown: str) -> list[list[list[str]]]:
    """Each markdown table as rows of cells (header first, the |---| line dropped)."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def plot_ratios(name: str, markdown: str) -> list[str]:
    """A bar chart per table that has ratio columns (header with "vs" or "x", cells like 1.23x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for i, table in enumerate(tables(markdown)):
        header, rows = table[0], table[1:]
        columns = [j for j, h in enumerate(header) if re.search(r"\bvs\b|\bx\b|ratio", h)
                   and all(re.fullmatch(r"[\d.]+x?", row[j]) for row in rows if j < len(row))]
        if not columns or not rows:
            continue
        fig, ax = plt.subplots(figsize=(8, 0.8 + 0.4 * len(rows) * len(columns)))
        numeric = {j for j in range(len(header)) if all(re.fullmatch(r"[\d.,]+x?", row[j]) for row in rows)}
        labels = [" ".join(cell for j, cell in enumerate(row) if j not in numeric) for row in rows]
        height = 0.8 / len(columns)
        for k, j in enumerate(columns):
            values = [float(row[j].rstrip("x")) for row in rows]
            # A repeated ratio header ("x bnb" after quantize and after dequantize) is named by
            # the nearest column before it whose header is unique ("quantize ms").
            context = next((header[i] for i in range(j - 1, -1, -1) if header.count(header[i]) == 1), "")
            ax.barh([y + k * height for y in range(len(rows))], values, height=height,
                    label=f"{header[j]} ({context})" if [header[c] for c in columns].count(header[j]) > 1 else header[j])
        ax.set_yticks([y + height * (len(columns) - 1) / 2 for y in range(len(rows))], labels)
        ax.set_xscale("log")  # ratios: 2x faster and 2x slower are equally far from 1
        ax.axvline(1.0, color="grey", linewidth=0.8)
        ax.invert_yaxis()
        ax.legend(fontsize="small")
        ax.set_title(name)
        fig.tight_layout()
        path = os.path.join(HERE, f"{name}{'' if i == 0 else f'_{i}'}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this script (e.g. nf4_quantize); may repeat")
    parser.add_argument("--quick", action="store_true", help="each script's smallest setting (a smoke run)")
    parser.add_argument("--list", action="store_true", help="say what would run and exit")
    parser.add_argument("--out", default=RESULTS, help="where to write the results (default bench/RESULTS.md)")
    args = parser.parse_args(argv)
    device, name = machine()
    scripts = discover()
    to_run, skipped = plan(scripts, device, args.only)
    if args.list:
        for script in to_run:
            print(f"run   {script}")
        for script, why in skipped.items():
            print(f"skip  {script}: {why}")
        return 0
    plots = importlib.util.find_spec("matplotlib") is not None
    sections, failed = [], 0
    for script in to_run:
        print(f"running {script} ...", file=sys.stderr, flush=True)
        text, seconds, status = run_script(script, scripts[script], args.quick)
        failed += status != 0
        images = plot_ratios(script, text) if plots and status == 0 else []
        pictures = "".join(f"\n![{script}]({os.path.relpath(p, os.path.dirname(os.path.abspath(args.out)))})\n"
                           for p in images)
        sections.append(f"## {script}.py\n\n_{seconds:.0f} s{', --quick' if args.quick else ''}_\n\n"
                        f"{text.strip()}\n{pictures}")
    header = [
        "# Benchmark results",
        "",
        f"Machine: {name}. Date: {datetime.date.today()}. torch {torch.__version__}, Python "
        f"{platform.python_version()}{', quick settings (smoke run, not for comparison)' if args.quick else ''}.",
        "Written by `python bench/run_all.py`; each section is one script's own output.",
    ]
    if skipped:
        header += ["", "Not run here: " + "; ".join(f"`{s}` ({why})" for s, why in skipped.items()) + "."]
    if not plots:
        header += ["", "No plots: matplotlib is not installed."]
    write_atomically({args.out: write_text("\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n")})
    print(f"wrote {args.out} ({len(to_run)} scripts, {failed} failed)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
