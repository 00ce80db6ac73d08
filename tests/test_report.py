"""The report writes Markdown, JSON and real PNG plots."""

import json

import torch
from torch import nn

from rankshrink.analysis import analyze
from rankshrink.report import write_report


def test_report_files_and_plots(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    analysis = analyze(model, torch.randn(1, 1, 8, 8))
    curves = {"3": [(1, 0.3), (2, 0.6), (4, 0.9), (8, 0.95)]}
    tradeoff = [{"macs": 1000, "accuracy": 0.9}, {"macs": 2000, "accuracy": 0.95, "chosen": True}]
    summary = {"original": {"accuracy": 0.96, "macs": 9000, "params": 5000},
               "compressed": {"accuracy": 0.95, "macs": 2000, "params": 1500}}
    out = write_report(tmp_path / "r", analysis, curves=curves, tradeoff=tradeoff, summary=summary)
    text = (out / "report.md").read_text()
    assert "| accuracy | 0.9600 | 0.9500 |" in text and "spectra.png" in text
    for name in ("spectra.png", "metric_vs_rank.png", "macs_vs_metric.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert data["curves"]["3"][2] == [4, 0.9]
    assert [layer["name"] for layer in data["analysis"]["layers"]] == ["0", "3"]
