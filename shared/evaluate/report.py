"""The human report of an evaluation: report.md, report.html and loss_curves.png.

It shows what the tutorial shows after fine-tuning: the metric table of the base model
(微调前) against the tuned one (微调后) with the difference, the training and dev loss
curves from the finetune artifacts, the gate's verdict, and a side-by-side sample of
questions with the reference answer and both models' answers.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.evaluate.metrics import METRICS

_LABELS = {
    "rouge-1": "ROUGE-1 (F1 ×100)",
    "rouge-2": "ROUGE-2 (F1 ×100)",
    "rouge-l": "ROUGE-L (F1 ×100)",
    "bleu-4": "BLEU-4 (×100)",
    "answer_chars": "Average answer length (characters)",
    "empty_share": "Share of empty answers",
    "ended_share": "Share of answers that ended before the token cap",
}
_MD_CELL_CHARS = 400
PLOT_NAME = "loss_curves.png"


@dataclass
class ReportInput:
    base: dict[str, float]
    tuned: dict[str, float]
    gate: dict[str, Any]
    samples: list[dict[str, str]]  # question, reference, base, tuned
    summary: dict[str, Any] = field(default_factory=dict)  # finetune's training_summary.json
    facts: dict[str, Any] = field(default_factory=dict)  # run id, base model, backend, examples…
    production: dict[str, float] | None = None  # the PROMOTED model's scores, when there is one
    golden: dict[str, Any] | None = None  # {"base", "tuned", ["production"], "examples", "source"}


def _verdict(gate: dict[str, Any]) -> str:
    """PASSED / FAILED, and what an inconclusive verdict became under the policy."""
    word = "PASSED" if gate.get("passed") else "FAILED"
    if gate.get("verdict") == "inconclusive":
        return f"{word} (inconclusive, {'allowed as a first promotion' if gate.get('passed') else 'blocked'})"
    return word


def _fmt(name: str, value: float) -> str:
    return f"{value:.1%}" if name in ("empty_share", "ended_share") else f"{value:.2f}"


def _delta(name: str, base: float, tuned: float) -> str:
    diff = tuned - base
    return f"{diff:+.1%}" if name in ("empty_share", "ended_share") else f"{diff:+.2f}"


def metric_header(production: bool) -> list[str]:
    cols = ["Metric", "Base (微调前)"]
    cols += ["Production (PROMOTED)"] if production else []
    cols += ["Candidate (微调后)", "Δ vs base"]
    return cols + (["Δ vs production"] if production else [])


def metric_rows(base: dict[str, float], tuned: dict[str, float], production: dict[str, float] | None = None) -> list[list[str]]:
    """One row per metric: label, base, [production], candidate, delta vs base, [delta vs production]."""
    names = [n for n in (*METRICS, "answer_chars", "empty_share", "ended_share") if n in base and n in tuned]
    rows = []
    for n in names:
        row = [_LABELS.get(n, n), _fmt(n, base[n])]
        row += [_fmt(n, production[n])] if production is not None else []
        row += [_fmt(n, tuned[n]), _delta(n, base[n], tuned[n])]
        row += [_delta(n, production[n], tuned[n])] if production is not None else []
        rows.append(row)
    return rows


_STATUS = {"pass": "passes", "fail": "FAILS", "inconclusive": "inconclusive"}


def gate_rows(gate: dict[str, Any]) -> list[list[str]]:
    """One row per comparison check: what was compared, n, the mean difference, its interval, the threshold, the result."""
    rows = []
    for c in gate.get("checks", []):
        if "interval" not in c:
            continue
        low, high = c["interval"]
        against = {"base": "base", "promoted": "production"}.get(c.get("compare"), c.get("compare"))
        rows.append([c["metric"], f"{c['kind'].replace('_', '-')} over {against}", str(c["n"]), f"{c['value']:+.2f}",
                     f"{low:+.2f} .. {high:+.2f}", f"> {c['threshold']:+g}", _STATUS[c["status"]]])
    return rows


GATE_HEADER = ["Metric", "Rule", "n", "Mean difference", "Interval", "Lower bound must be", "Result"]


def _gate_caption(gate: dict[str, Any]) -> str:
    questions = {"all": "test split and golden set", "test": "test split", "golden": "golden set"}.get(gate.get("questions"), "")
    return (f"Paired bootstrap over {gate.get('n')} questions ({questions}), "
            f"{gate.get('confidence', 0.95):.0%} intervals of candidate minus the model compared with.")


def _tables(data: ReportInput) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the test split's table and, when scored, the golden set's."""
    out = [("Metrics (test split)", metric_header(data.production is not None),
            metric_rows(data.base, data.tuned, data.production))]
    if data.golden:
        prod = data.golden.get("production")
        out.append((f"Metrics (golden set: {data.golden.get('examples')} questions, {data.golden.get('source')})",
                    metric_header(prod is not None), metric_rows(data.golden["base"], data.golden["tuned"], prod)))
    return out


def plot_loss_curves(summary: dict[str, Any], path: Path) -> bool:
    """Write the training/dev loss plot; False when the summary has no curve (the file then says so)."""
    train = summary.get("train_loss_curve") or []
    dev = summary.get("dev_loss_curve") or []
    import matplotlib

    matplotlib.use("Agg")  # headless: no display in a Job
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="training loss", color="#1f77b4")
    if dev:
        ax.plot([s for s, _ in dev], [v for _, v in dev], "o-", label="dev loss", color="#d62728")
    best = summary.get("best_step")
    if best is not None:
        ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best step {best}")
    if not train and not dev:
        ax.text(0.5, 0.5, "no loss curve was recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Fine-tuning loss")
    ax.grid(alpha=0.3)
    if train or dev:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return bool(train or dev)


def _sample_columns(data: ReportInput) -> tuple[list[str], list[str]]:
    keys = ["question", "reference", "base"] + (["production"] if data.production is not None else []) + ["tuned"]
    names = {"question": "Question", "reference": "Reference", "base": "Base (微调前)", "production": "Production",
             "tuned": "Candidate (微调后)"}
    return keys, [names[k] for k in keys]


def _md_cell(text: str) -> str:
    text = text if len(text) <= _MD_CELL_CHARS else text[:_MD_CELL_CHARS] + "…"
    return (text or "*(empty)*").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def render_markdown(data: ReportInput, has_plot: bool) -> str:
    verdict = _verdict(data.gate)
    lines = ["# Evaluation report: before and after fine-tuning (微调前 / 微调后)", ""]
    lines += [f"- **{k}**: {v}" for k, v in data.facts.items()]
    lines += ["", f"## Quality gate: {verdict}", ""]
    lines += [f"- {r}" for r in data.gate.get("reasons", [])]
    if gate_rows(data.gate):
        lines += ["", _gate_caption(data.gate), "", "| " + " | ".join(GATE_HEADER) + " |", "| --- |" + " --- |" * (len(GATE_HEADER) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in gate_rows(data.gate)]
    for title, header, rows in _tables(data):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## Loss curves", ""]
    lines += [f"![training and dev loss]({PLOT_NAME})" if has_plot else "*No loss curve was recorded by the fine-tuning run.*"]
    best = data.summary.get("best_step")
    if best is not None:
        lines += ["", f"Best checkpoint: step {best}, dev loss {data.summary.get('best_dev_loss', float('nan')):.4f}."]
    keys, names = _sample_columns(data)
    lines += ["", f"## Sample answers ({len(data.samples)})", "",
              "| # | " + " | ".join(names) + " |", "| ---: |" + " --- |" * len(names)]
    for i, s in enumerate(data.samples, 1):
        cells = [_md_cell(s[k]) for k in keys]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.4em .6em;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.text{white-space:pre-wrap;max-width:28em}.pass{color:#137333}.fail{color:#c5221f}.empty{color:#999;font-style:italic}"""


def _td_text(text: str) -> str:
    return f'<td class="text">{html.escape(text)}</td>' if text else '<td class="text empty">(empty)</td>'


def render_html(data: ReportInput, plot_png: str | None) -> str:
    """The HTML report; ``plot_png`` is the loss plot as base64 PNG (None: no curve was recorded)."""
    e = html.escape
    passed = bool(data.gate.get("passed"))
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>lawtune evaluation report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>Evaluation report: before and after fine-tuning (微调前 / 微调后)</h1>",
        "<ul>" + "".join(f"<li><b>{e(str(k))}</b>: {e(str(v))}</li>" for k, v in data.facts.items()) + "</ul>",
        f'<h2>Quality gate: <span class="{"pass" if passed else "fail"}">{e(_verdict(data.gate))}</span></h2>',
        "<ul>" + "".join(f"<li>{e(r)}</li>" for r in data.gate.get("reasons", [])) + "</ul>",
    ]
    if gate_rows(data.gate):
        parts += [f"<p>{e(_gate_caption(data.gate))}</p>", "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in GATE_HEADER) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in gate_rows(data.gate)]
        parts.append("</table>")
    for title, header, rows in _tables(data):
        parts += [f"<h2>{e(title)}</h2>", "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
        parts += ["<tr><td>" + e(row[0]) + "</td>" + "".join(f'<td class="num">{c}</td>' for c in row[1:]) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("<h2>Loss curves</h2>")
    # Embedded, so the page still shows the plot when opened from a download or a mail.
    parts.append(f'<img src="data:image/png;base64,{plot_png}" alt="training and dev loss">' if plot_png
                 else "<p><i>No loss curve was recorded by the fine-tuning run.</i></p>")
    keys, names = _sample_columns(data)
    parts += [f"<h2>Sample answers ({len(data.samples)})</h2>",
              "<table><tr><th>#</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"]
    for i, s in enumerate(data.samples, 1):
        parts.append(f'<tr><td class="num">{i}</td>' + "".join(_td_text(s[k]) for k in keys) + "</tr>")
    parts += ["</table>", "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(data: ReportInput, out_dir: Path) -> list[Path]:
    """Write report.md, report.html and loss_curves.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    has_plot = plot_loss_curves(data.summary, out_dir / PLOT_NAME)
    (out_dir / "report.md").write_text(render_markdown(data, has_plot), encoding="utf-8")
    plot_png = base64.b64encode((out_dir / PLOT_NAME).read_bytes()).decode("ascii") if has_plot else None
    (out_dir / "report.html").write_text(render_html(data, plot_png), encoding="utf-8")
    return [out_dir / n for n in ("report.md", "report.html", PLOT_NAME)]
