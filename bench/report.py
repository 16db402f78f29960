"""Human-readable views of a run record: markdown tables (kernels, training steps) and bar charts of GB/s
(memory-bound ops) and TFLOP/s (compute-bound ops: attention, the LLM head's cross-entropy)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from .train import ENGINE_IMPLEMENTATION, TRANSFORMERS_IMPLEMENTATION  # noqa: E402

# Fixed colours for the engine's backends; the baselines take the next colours of tab20 in order of appearance.
IMPLEMENTATION_COLORS = {"torch": "tab:gray", "triton": "tab:blue", "cuda": "tab:green"}
MIB = 2**20


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _percent(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _note(row: dict) -> str:
    return "" if row["status"] == "ok" else f"{row['status']}: {row['reason']}".replace("|", "/").replace("\n", " ")


def _header(record: dict) -> list[str]:
    device, ceilings = record["device"], record["ceilings"]
    engine = record["versions"]["internvl3_engine"]
    matmul, datasheet = ceilings["matmul"], ceilings.get("datasheet")
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
        f"{matmul['dtype']} matmul {matmul['n']}^3 {_number(matmul['tflop_per_s'], 2)} TFLOP/s measured"
        + (f"; datasheet {datasheet['dtype']} {_number(datasheet['tflop_per_s'], 0)} TFLOP/s ({datasheet['device_name']})"
           if datasheet else "; no datasheet peak known for this device"),
        "",
    ]


def _table(columns: list[tuple[str, bool]], rows: list[list[str]]) -> list[str]:
    """A markdown table: ``columns`` are (title, right-aligned: a number), ``rows`` their cells."""
    lines = ["| " + " | ".join(title for title, _ in columns) + " |",
             "|" + "|".join("---:" if numeric else "---" for _, numeric in columns) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows] + [""]


def _ratio(value) -> str:
    return f"{value:.2f}x" if value else "-"


KERNEL_COLUMNS = [
    ("op", False), ("case", False), ("direction", False), ("implementation", False), ("median (us)", True),
    ("device (us)", True), ("GB/s", True), ("of copy", True), ("of copy (device)", True), ("TFLOP/s", True),
    ("of matmul", True), ("bwd TFLOP/s", True), ("vs torch", True), ("workspace (MiB)", True), ("note", False),
]


def _skipped_lines(rows: list[dict]) -> list[str]:
    """The skipped rows (implementations that cannot run on this machine) as one line per implementation and
    reason, instead of table rows of dashes."""
    reasons: dict = {}
    for row in rows:
        reasons.setdefault((row["implementation"], row["reason"]), []).append(row["op"])
    lines = [f"Not run here ({len(rows)} rows):", ""]
    for (implementation, reason), ops in sorted(reasons.items()):
        lines.append(f"- {implementation} ({len(ops)} rows: {', '.join(sorted(set(ops)))}): {reason}".replace("\n", " "))
    return lines + [""]


def _kernel_lines(rows: list[dict]) -> list[str]:
    skipped = [row for row in rows if row["status"] == "skipped"]
    rows = [row for row in rows if row["status"] != "skipped"]
    cells = []
    for row in rows:
        workspace = row.get("workspace_bytes")
        cells.append([
            row["op"], row["case"], row["direction"], row["implementation"],
            _number(row["median_ms"] * 1e3, 1) if row["status"] == "ok" else "-",
            _number(None if row.get("device_ms") is None else row["device_ms"] * 1e3, 1),
            _number(row.get("gb_per_s"), 1), _percent(row.get("fraction_of_copy")),
            _percent(row.get("device_fraction_of_copy")),
            _number(row.get("tflop_per_s"), 2), _percent(row.get("fraction_of_matmul")),
            _number(row.get("backward_tflop_per_s"), 2),
            _ratio(row.get("speedup_vs_torch")),
            _number(None if workspace is None else workspace / MIB, 0),
            _note(row),
        ])
    intro = [
        "## Kernels",
        "",
        "GB/s for memory-bound ops (of the copy ceiling), TFLOP/s for compute-bound ones (of the matmul ceiling; "
        "'bwd' = the backward alone, forward+backward minus forward). Workspace = peak memory above the inputs. "
        "Median = wall time per call; device = the GPU's own time per call (its kernels' summed durations, "
        "torch.profiler), without the host's overhead; 'of copy (device)' is the bandwidth over the device time.",
        "",
    ]
    return intro + _table(KERNEL_COLUMNS, cells) + (_skipped_lines(skipped) if skipped else [])


TRAIN_COLUMNS = [
    ("preset", False), ("batch", False), ("implementation", False), ("dtype", False), ("step (ms)", True),
    ("tokens/s", True), ("padding", True), ("peak memory (GiB)", True), ("model TFLOP/step", True),
    ("TFLOP/s", True), ("MFU (measured)", True), ("MFU (datasheet)", True), ("vs transformers", True),
    ("note", False),
]


def _train_lines(rows: list[dict], ceilings: dict) -> list[str]:
    cells = []
    for row in rows:
        peak = row.get("peak_memory_bytes")
        cells.append([
            row["preset"], row["case"], row["implementation"], row["dtype"],
            _number(row.get("median_step_ms"), 1), _number(row.get("tokens_per_s"), 0),
            _percent(row.get("padding_fraction")), _number(None if peak is None else peak / 2**30, 2),
            _number(row["model_flops"]["total"] / 1e12, 3) if row["status"] == "ok" else "-",
            _number(row.get("model_tflop_per_s"), 2),
            _percent(row.get("mfu_vs_matmul")), _percent(row.get("mfu_vs_datasheet")),
            _ratio(row.get("speedup_vs_transformers")),
            _note(row),
        ])
    datasheet = ceilings.get("datasheet")
    intro = [
        "## Training step (forward + backward + AdamW)",
        "",
        f"MFU = model FLOPs per step / (step time x peak): against the matmul ceiling measured in this run "
        f"({_number(ceilings['matmul']['tflop_per_s'], 1)} TFLOP/s) and the datasheet "
        f"({_number(datasheet['tflop_per_s'], 0) + ' TFLOP/s' if datasheet else 'unknown here'}). "
        f"{ENGINE_IMPLEMENTATION} trains on the packed batch; {TRANSFORMERS_IMPLEMENTATION} (transformers' InternVL, "
        "sdpa attention) on the same samples padded to the longest: tokens/s and MFU count the real tokens only, "
        "padding = its share of the padded batch, 'vs transformers' = its step time / ours.",
        "",
    ]
    return intro + _table(TRAIN_COLUMNS, cells)


def markdown(record: dict) -> str:
    lines = _header(record)
    if record.get("results"):
        lines += _kernel_lines(record["results"])
    if record.get("train"):
        lines += _train_lines(record["train"], record["ceilings"])
    return "\n".join(lines)


def _colors(implementations: list[str]) -> dict[str, str]:
    # tab20 holds the fixed colours too (tab:blue is its first): the baselines skip them.
    taken = {to_hex(color) for color in IMPLEMENTATION_COLORS.values()}
    palette = (color for color in plt.get_cmap("tab20").colors if to_hex(color) not in taken)
    return {name: IMPLEMENTATION_COLORS.get(name) or next(palette) for name in implementations}


def _bar_chart(record: dict, value: str, ceiling: float, ceiling_label: str, xlabel: str, path: Path) -> Path | None:
    """Horizontal grouped bars of ``value`` per (op case, direction), one bar per implementation; the
    ceiling as a dashed line. None (no file) when no row has ``value``."""
    timed = [row for row in record["results"] if row["status"] == "ok" and row.get(value) is not None]
    if not timed:
        return None
    group_of = lambda r: f"{r['op']} [{r['direction']}]\n{r['case']}"  # noqa: E731
    groups = list(dict.fromkeys(group_of(r) for r in timed))
    implementations = list(dict.fromkeys(r["implementation"] for r in timed))
    colors = _colors(implementations)
    height = 0.8 / max(len(implementations), 1)
    figure, axes = plt.subplots(figsize=(12, max(4.0, 0.3 * len(timed) + 0.4 * len(groups) + 1.5)))
    for b, implementation in enumerate(implementations):
        values = {group_of(r): r[value] for r in timed if r["implementation"] == implementation}
        ys = [g + (b - (len(implementations) - 1) / 2) * height for g, name in enumerate(groups) if name in values]
        axes.barh(ys, [values[name] for name in groups if name in values], height,
                  label=implementation, color=colors[implementation])
    axes.axvline(ceiling, color="tab:red", linestyle="--", label=ceiling_label)
    axes.set_yticks(range(len(groups)), groups, fontsize=7)
    axes.invert_yaxis()  # first op at the top, as in the table
    axes.set_xlabel(xlabel)
    axes.set_title(f"{record['device']['name']}: {record['suite']} ({record['sizes']}), {record['date_utc']}", fontsize=10)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot(record: dict, stem: Path) -> list[Path]:
    """``<stem>.png``: GB/s of the memory-bound ops against the copy ceiling; ``<stem>_tflops.png``: TFLOP/s
    of the compute-bound ops (attention per implementation and rotary mode, cross-entropy) against the matmul
    ceiling. Returns the files written (none without kernel rows)."""
    if not record.get("results"):
        return []
    copy = record["ceilings"]["copy"]["gb_per_s"]
    matmul = record["ceilings"]["matmul"]["tflop_per_s"]
    charts = [
        _bar_chart(record, "gb_per_s", copy, f"copy ceiling {copy:,.0f} GB/s", "GB/s (bytes read + written)",
                   stem.with_name(stem.name + ".png")),
        _bar_chart(record, "tflop_per_s", matmul, f"matmul ceiling {matmul:,.1f} TFLOP/s",
                   "TFLOP/s (FlashAttention's count for attention; 2THV + 4THV for the head)",
                   stem.with_name(stem.name + "_tflops.png")),
    ]
    return [path for path in charts if path is not None]
