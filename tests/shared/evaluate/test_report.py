"""shared/evaluate/report.py: the before/after report a person reads, in Markdown and HTML, with the loss plot."""

from __future__ import annotations

import base64

import pytest

from shared.evaluate.report import ReportInput, write_report

SUMMARY = {"best_step": 4, "best_dev_loss": 2.25, "train_loss_curve": [[1, 3.0], [2, 2.5], [4, 2.2]],
           "dev_loss_curve": [[2, 2.6], [4, 2.25]]}


def _input(summary=SUMMARY, samples=None, passed=True):
    return ReportInput(
        base={"rouge-1": 10.0, "rouge-2": 2.5, "rouge-l": 8.0, "bleu-4": 1.5, "answer_chars": 100.0, "empty_share": 0.25},
        tuned={"rouge-1": 31.25, "rouge-2": 12.0, "rouge-l": 24.5, "bleu-4": 9.0, "answer_chars": 60.0, "empty_share": 0.0},
        gate={"passed": passed, "reasons": ["ok rouge-l: tuned 24.50 >= min 10.00"] if passed else ["FAIL rouge-l: tuned 24.50 < min 30.00"]},
        samples=samples if samples is not None else [
            {"question": "劳动合同到期怎么办？", "reference": "应当支付经济补偿。", "base": "I don't know | sorry", "tuned": "应当支付\n经济补偿。"},
            {"question": "<b>bold?</b>", "reference": "x", "base": "", "tuned": "y"},
        ],
        summary=summary,
        facts={"run": "r1", "base model": "bundled:smollm2-135m-instruct"},
    )


def test_report_has_both_columns_deltas_samples_and_plot(tmp_path):
    files = write_report(_input(), tmp_path)
    assert sorted(p.name for p in files) == ["loss_curves.png", "report.html", "report.md"]
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| Metric | Base (微调前) | Candidate (微调后) | Δ vs base |" in md
    assert "Production" not in md, "no production column while nothing is promoted"
    assert "| ROUGE-1 (F1 ×100) | 10.00 | 31.25 | +21.25 |" in md
    assert "| Average answer length (characters) | 100.00 | 60.00 | -40.00 |" in md
    assert "| Share of empty answers | 25.0% | 0.0% | -25.0% |" in md
    assert "## Quality gate: PASSED" in md
    assert "![training and dev loss](loss_curves.png)" in md
    assert "Best checkpoint: step 4, dev loss 2.2500." in md
    # A table cell keeps its row: pipes are escaped, newlines become <br>, empty answers are marked.
    assert "| 1 | 劳动合同到期怎么办？ | 应当支付经济补偿。 | I don't know \\| sorry | 应当支付<br>经济补偿。 |" in md
    assert "*(empty)*" in md
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<th>Base (微调前)</th><th>Candidate (微调后)</th>" in html
    assert "&lt;b&gt;bold?&lt;/b&gt;" in html and "<b>bold?</b>" not in html, "answers are escaped, never markup"
    # The plot is inside the page (a data URI), so a downloaded report.html still shows it.
    png = (tmp_path / "loss_curves.png").read_bytes()
    assert f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html
    assert 'src="loss_curves.png"' not in html
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("summary", [pytest.param({}, id="no-summary"), pytest.param({"train_loss_curve": []}, id="empty-curve")])
def test_report_without_loss_curve_says_so(tmp_path, summary):
    write_report(_input(summary=summary, samples=[], passed=False), tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "No loss curve was recorded" in md
    assert "## Quality gate: FAILED" in md and "FAIL rouge-l" in md
    assert "## Sample answers (0)" in md
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG", "the contract's file exists even without a curve"


def test_production_column_with_deltas_and_golden_table(tmp_path):
    data = _input()
    data.production = {"rouge-1": 30.0, "rouge-2": 11.0, "rouge-l": 25.0, "bleu-4": 8.0, "answer_chars": 70.0, "empty_share": 0.1}
    data.samples = [{"question": "q", "reference": "r", "base": "b", "production": "p", "tuned": "t"}]
    data.golden = {"base": data.base, "tuned": data.tuned, "production": data.production, "examples": 22,
                   "source": "configs/data/legal_golden.csv"}
    write_report(data, tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| Metric | Base (微调前) | Production (PROMOTED) | Candidate (微调后) | Δ vs base | Δ vs production |" in md
    assert "| ROUGE-L (F1 ×100) | 8.00 | 25.00 | 24.50 | +16.50 | -0.50 |" in md
    assert "## Metrics (golden set: 22 questions, configs/data/legal_golden.csv)" in md
    assert md.count("| ROUGE-L (F1 ×100) | 8.00 | 25.00 | 24.50 | +16.50 | -0.50 |") == 2
    assert "| 1 | q | r | b | p | t |" in md
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<th>Production (PROMOTED)</th><th>Candidate (微调后)</th><th>Δ vs base</th><th>Δ vs production</th>" in html
