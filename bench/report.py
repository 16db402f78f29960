"""Human-readable views of a run record: a markdown table and a bar chart of GB/s."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

BACKEND_COLORS = {"torch": "tab:gray", "triton": "tab:blue", "cuda": "tab:green"}


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _header(record: dict) -> list[str]:
    device, ceilings = record["device"], record["ceilings"]
    engine = record["versions"]["internvl3_engine"]
    matmul = ceilings["matmul"]
    return [
        f"# Benchmark: {record['suite']} suite, {record['sizes']} sizes",
        "",
        f"- Date (UTC): {record['date_utc']}",
        f"- Device: {device['name']}" + (
            f" (SM {device.get('sm_clock_mhz')}/{device.get('sm_clock_max_mhz')} MHz, memory "
            f"{device.get('memory_clock_mhz')}/{device.get('memory_clock_max_mhz')} MHz, "
            f"power limit {device.get('power_limit_w')} W)" if device["type"] == "cuda" else
            f" ({device['cpu_cores']} cores; CPU timings are a smoke test only)"),
        f"- Versions: internvl3_engine {engine['version']}, torch {engine['torch']}, triton {engine['triton']}, "
        f"python {record['versions']['python']}",
        f"- Command: `{record['command']}`",
        f"- Timing: {record['timing']['method']}",
        f"- Ceilings: copy {_number(ceilings['copy']['gb_per_s'], 1)} GB/s (read + write); "
        f"{matmul['dtype']} matmul {matmul['n']}^3 {_number(matmul['tflop_per_s'], 2)} TFLOP/s",
        "",
    ]


def markdown(record: dict) -> str:
    lines = _header(record) + [
        "| op | case | direction | backend | median (us) | MB moved | GB/s | of copy | vs torch | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in record["results"]:
        timed = row["status"] == "ok"
        cells = [
            row["op"], row["case"], row["direction"], row["backend"],
            _number(row["median_ms"] * 1e3, 1) if timed else "-",
            _number(row["bytes"] / 1e6, 3) if timed else "-",
            _number(row.get("gb_per_s"), 1),
            f"{row['fraction_of_copy']:.0%}" if timed else "-",
            f"{_number(row.get('speedup_vs_torch'), 2)}x" if timed and row.get("speedup_vs_torch") else "-",
            "" if timed else f"{row['status']}: {row['reason']}".replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> Path:
    """Horizontal grouped bars: GB/s per (op case, direction), one bar per backend; the copy ceiling as a line."""
    timed = [row for row in record["results"] if row["status"] == "ok"]
    group_of = lambda r: f"{r['op']} [{r['direction']}]\n{r['case']}"  # noqa: E731
    groups = list(dict.fromkeys(group_of(r) for r in timed))
    backends = list(dict.fromkeys(r["backend"] for r in timed))
    height = 0.8 / max(len(backends), 1)
    figure, axes = plt.subplots(figsize=(11, max(4.0, 0.75 * len(groups) + 1.5)))
    for b, backend in enumerate(backends):
        values = {group_of(r): r["gb_per_s"] for r in timed if r["backend"] == backend}
        ys = [g + (b - (len(backends) - 1) / 2) * height for g, name in enumerate(groups) if name in values]
        axes.barh(ys, [values[name] for name in groups if name in values], height,
                  label=backend, color=BACKEND_COLORS.get(backend))
    copy = record["ceilings"]["copy"]["gb_per_s"]
    axes.axvline(copy, color="tab:red", linestyle="--", label=f"copy ceiling {copy:,.0f} GB/s")
    axes.set_yticks(range(len(groups)), groups, fontsize=7)
    axes.invert_yaxis()  # first op at the top, as in the table
    axes.set_xlabel("GB/s (bytes read + written)")
    axes.set_title(f"{record['device']['name']}: {record['suite']} ({record['sizes']}), {record['date_utc']}", fontsize=10)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
