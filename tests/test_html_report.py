"""report.html: drawn from a real compress run, checked as a file and as a person sees it in headless Chromium.

Every number the page shows from summary.json carries its JSON pointer (``data-key``); the checks
resolve each pointer in summary.json itself and compare both the exact value (``data-value``) and
the text shown (to the precision shown). The browser test installs Debian's ``chromium`` when it
is missing (as root, with apt-get) and skips, saying why, only when that is impossible. Its
screenshots (desktop and phone width) are kept in the test's tmp directory, and copied to
``$RANKSHRINK_TEST_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import base64
import copy
import html.parser
import io
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from rankshrink.cli import main
from rankshrink.html_report import REPORT_FILE, pareto_front, resolve, write_html_report

sys.path.insert(0, str(Path(__file__).parent))
from browser import Browser, find_or_install_chromium  # noqa: E402

ARTIFACTS = os.environ.get("RANKSHRINK_TEST_ARTIFACTS")
SECTIONS = ("summary", "layers", "spectra", "curves", "tradeoff", "run")


# --------------------------------------------------------------------------- a real run

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, _session_models):
    """A compress run of the trained digits CNN at a 1-point tolerance, with one-layer probes (so every plot
    of the report has something to draw): (run dir, model, splits, weights)."""
    from rankshrink.files import save_tensors
    from rankshrink.models import load_builtin
    from rankshrink.search.evaluate import single_threaded

    root = tmp_path_factory.mktemp("report-run")
    shutil.copytree(_session_models, root / "cache" / "models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKSHRINK_CACHE", str(root / "cache"))
        with single_threaded():
            model, splits = load_builtin("digits-cnn", cache_dir=root / "cache", progress=False)
        for path in (root / "cache" / "models").glob("*.safetensors"):  # share a freshly trained model
            if not (_session_models / path.name).exists():
                shutil.copy2(path, _session_models / path.name)
        weights = root / "digits.safetensors"
        save_tensors(weights, model.state_dict())
        out = root / "run"
        assert main(["compress", "--model", "builtin:digits-cnn", "--weights", str(weights), "--data",
                     "builtin:digits", "--tolerance", "1%", "--out", str(out), "--quiet", "--cache",
                     str(root / "evaluations"), "--sensitivity", "probe"]) == 0  # probes: metric-vs-rank curves
    return out, model, splits, weights


def _summary(directory: Path) -> dict:
    return json.loads((directory / "summary.json").read_text())


class _Numbers(html.parser.HTMLParser):
    """(data-key, data-value, shown text) of every element carrying data-key; the images' sources."""

    def __init__(self):
        super().__init__()
        self.items: list[list[str]] = []
        self.images: list[str] = []
        self.ids: list[str] = []
        self.tags: set[str] = set()
        self._open: list[list] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for entry in self._open:
            entry[1] += 1 if tag == entry[0] else 0
        if "data-key" in attrs:
            self._open.append([tag, 0, attrs["data-key"], attrs["data-value"], ""])

    def handle_endtag(self, tag):
        for entry in list(self._open):
            if entry[0] == tag:
                if entry[1] == 0:
                    self._open.remove(entry)
                    self.items.append([entry[2], entry[3], entry[4]])
                else:
                    entry[1] -= 1

    def handle_data(self, data):
        for entry in self._open:
            entry[4] += data


def _parse(page: str) -> _Numbers:
    parser = _Numbers()
    parser.feed(page)
    return parser


def shown_number(text: str) -> tuple[float, float]:
    """(value, half a unit of the last digit shown) of a number as the page prints it."""
    t = text.strip().split(" (")[0].replace(",", "")
    scale = 1.0
    for suffix, factor in (("%", 0.01), ("×", 1.0), (" ms", 1.0)):
        if t.endswith(suffix):
            t, scale = t[:-len(suffix)], factor
            break
    mantissa, _, exponent = t.partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return float(t) * scale, 0.5 * 10 ** (int(exponent or 0) - decimals) * scale + 1e-12


def check_numbers(items, summary: dict) -> int:
    """Every shown value equals summary.json's at its pointer (exactly, and to the digits shown)."""
    for key, raw, text in items:
        value = resolve(summary, key)
        assert json.loads(raw) == value, (key, raw, value)
        if isinstance(value, str):
            assert text.strip() == value, (key, text)
        else:
            shown, tolerance = shown_number(text)
            assert abs(shown - value) <= tolerance, (key, text, value)
    return len(items)


# --------------------------------------------------------------------------- the page as a file

@pytest.mark.slow
def test_compress_writes_a_self_contained_report(digits_run):
    out, model, splits, _ = digits_run
    summary = _summary(out)
    page = (out / REPORT_FILE).read_text(encoding="utf-8")
    parsed = _parse(page)
    assert [i for i in parsed.ids if i in SECTIONS] == list(SECTIONS)
    # Nothing leaves the file: no scripts, no stylesheets or fonts to fetch, every image inline.
    assert not parsed.tags & {"script", "link", "iframe", "object", "embed"}
    assert "http://" not in page and "https://" not in page and "@import" not in page and "url(" not in page
    assert parsed.images and all(src.startswith("data:image/svg+xml;base64,") for src in parsed.images)
    n_layers = len(summary["spectra"])
    probed = {name for name, probe in summary["probes"].items() if probe["evaluated"]}
    assert len(parsed.images) == n_layers + len(probed) + 1  # spectra, curves, the scatter
    for src in parsed.images:
        svg = ET.fromstring(base64.b64decode(src.split(",", 1)[1]))
        assert svg.tag.endswith("svg") and len(list(svg.iter("{http://www.w3.org/2000/svg}path"))) > 20
    # The numbers: before/after accuracy, sizes, per-class, per-layer, the chosen plan.
    keys = {key for key, _, _ in parsed.items}
    for key in ("/original/accuracy", "/compressed/accuracy", "/original/test_accuracy", "/compressed/test_accuracy",
                "/original/params", "/compressed/params", "/original/bytes", "/compressed/bytes", "/original/macs",
                "/compressed/macs", "/per_class/compressed/val/0", "/layers/0/params", "/run/data_fingerprint",
                "/drop_ci/validation/0", "/drop_ci/validation/1", "/drop_ci/test/1"):  # the honest interval too
        assert key in keys, key
    assert check_numbers(parsed.items, summary) >= 60
    assert "rankshrink compress --model builtin:digits-cnn" in page and torch.__version__ in page


@pytest.mark.slow
def test_summary_records_what_the_report_draws(digits_run):
    out, model, splits, weights = digits_run
    summary = _summary(out)
    plan = json.loads((out / "plan.json").read_text())["layers"]
    for name, entry in summary["spectra"].items():
        weight = model.get_submodule(name).weight.detach().double()
        expected = torch.linalg.svdvals(weight.reshape(weight.shape[0], -1))
        assert torch.allclose(torch.tensor(entry["singular_values"], dtype=torch.float64), expected, rtol=1e-5)
        m, n = entry["matrix"]
        assert entry["spectrum_break_even"] == (m * n - 1) // (m + n)  # the largest r with r(m+n) < mn
        if name in plan and plan[name]["method"] == "svd":
            assert entry["chosen_rank"] == plan[name]["rank"]
    fc = summary["spectra"]["classifier.1"]
    assert fc["matrix"] == [128, 512] and fc["break_even"]["svd"]["params"] == 102
    # Every evaluation record carries its plan's costs; the original's and the chosen plan's are the summary's.
    records = summary["records"]
    assert all({"params", "macs", "bytes"} <= set(r) for r in records)
    baseline = next(r for r in records if r["plan"] == {})
    assert {k: baseline[k] for k in ("params", "macs", "bytes")} == \
        {k: summary["original"][k] for k in ("params", "macs", "bytes")}
    chosen = [r for r in records if r["plan"] == plan]
    assert chosen and all({k: r[k] for k in ("params", "macs", "bytes")} ==
                          {k: summary["compressed"][k] for k in ("params", "macs", "bytes")} for r in chosen)
    # Per-class accuracies average (weighted by class sizes) to the accuracies reported.
    labels = splits.val.tensors[1]
    sizes = torch.bincount(labels, minlength=splits.num_classes).double()
    for side in ("original", "compressed"):
        per = torch.tensor(summary["per_class"][side]["val"], dtype=torch.float64)
        assert float((per * sizes).sum() / sizes.sum()) == pytest.approx(summary[side]["accuracy"], abs=1e-12)
    run = summary["run"]
    assert run["command"].startswith("rankshrink compress --model builtin:digits-cnn --weights")
    assert run["data_fingerprint"] == splits.fingerprint and run["versions"]["torch"] == torch.__version__
    from rankshrink.files import file_sha256

    assert run["weights_sha256"] == file_sha256(weights) and run["seed"] == 0
    # The Pareto front of the scatter: no evaluated plan beats a front point on both axes.
    points = [(r["macs"], r["value"]) for r in records]
    for x, y in pareto_front(points):
        assert not any(px <= x and py > y for px, py in points)


@pytest.mark.slow
def test_report_command_redraws_the_same_page(digits_run, tmp_path, capsys):
    out, _, _, _ = digits_run
    copy_dir = tmp_path / "copy"
    shutil.copytree(out, copy_dir)
    before = (copy_dir / REPORT_FILE).read_bytes()
    (copy_dir / REPORT_FILE).unlink()
    assert main(["report", str(copy_dir)]) == 0
    assert capsys.readouterr().out == f"wrote {copy_dir / REPORT_FILE}\n"
    assert (copy_dir / REPORT_FILE).read_bytes() == before  # deterministic: the same run, the same bytes
    elsewhere = tmp_path / "elsewhere.html"
    assert main(["report", str(copy_dir), "--out", str(elsewhere), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"report": str(elsewhere), "run": str(copy_dir)}
    assert elsewhere.read_bytes() == before
    # --out never replaces the run's own files.
    summary_before = (copy_dir / "summary.json").read_bytes()
    assert main(["report", str(copy_dir), "--out", str(copy_dir / "summary.json")]) == 1
    assert "never writes over" in capsys.readouterr().err
    assert (copy_dir / "summary.json").read_bytes() == summary_before


def _write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    return directory


PARTIAL = json.dumps({"format": "rankshrink-compress-summary", "version": 2,
                      "original": {"params": 10, "macs": 10, "bytes": 40}})
STRING_COUNT = json.dumps({"format": "rankshrink-compress-summary", "version": 2, "layers": [],
                           "original": {"params": "10", "macs": 10, "bytes": 40},
                           "compressed": {"params": 5, "macs": 5, "bytes": 20}})
BAD_RUNS = [
    ("missing", lambda d: d / "nothing-here", ("does not exist",)),
    ("a file", lambda d: _write(d, "x", "") / "x", ("is not a directory",)),
    ("no run", lambda d: _write(d / "r", "notes.txt", "mine"), ("holds no rankshrink run", "summary.json")),
    ("truncated JSON", lambda d: _write(d / "r", "summary.json", PARTIAL[:40]), ("corrupt", "not valid JSON")),
    ("not an object", lambda d: _write(d / "r", "summary.json", "[1, 2]"), ("corrupt", "list")),
    ("another file", lambda d: _write(d / "r", "summary.json", '{"model": "x"}'), ("not the summary of",)),
    ("partial", lambda d: _write(d / "r", "summary.json", PARTIAL), ("incomplete", "'compressed'", "'layers'")),
    ("wrong type", lambda d: _write(d / "r", "summary.json", STRING_COUNT), ("original.params", "not a number")),
]


@pytest.mark.parametrize("what,make,needles", BAD_RUNS, ids=[case[0] for case in BAD_RUNS])
def test_report_refuses_what_is_not_a_run(tmp_path, capsys, what, make, needles):
    target = make(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["report", str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rankshrink report: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, (what, err)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


@pytest.mark.slow
def test_a_run_without_labels_renders_and_says_what_needs_them(digits_run, tmp_path):
    """The summary of a run whose data has no labels: accuracies None, no per-class table, agreement."""
    out, _, _, _ = digits_run
    summary = _summary(out)
    for side in ("original", "compressed"):
        summary[side].update(accuracy=None, test_accuracy=None)
    summary.pop("per_class")
    summary["metric"] = "agreement"
    run = _write(tmp_path / "unlabelled", "summary.json", json.dumps(summary))
    page = write_html_report(run).read_text()
    assert page.count('<td class="needs-labels">needs labels</td>') == 4  # val and test, before and after
    assert "Per-class accuracy needs labels" in page and "Accuracy needs labels" in page
    parsed = _parse(page)
    assert "/original/metric" in {key for key, _, _ in parsed.items}  # the agreement the search used is shown
    assert check_numbers(parsed.items, summary) > 30
    assert "/per_class/original/val/0" not in page


ISSUE_14_ROWS = {  # what the deployment work records: latency per batch size, and the four shipped variants
    "latency_ms": {"original": {"1": {"median": 0.0412, "p90": 0.0456, "runs": 50, "threads": 1},
                                "32": {"median": 0.733, "p90": 0.801, "runs": 50, "threads": 1}},
                   "compressed": {"1": {"median": 0.0309, "p90": 0.0351, "runs": 50, "threads": 1},
                                  "32": {"median": 0.412, "p90": 0.455, "fastest": 0.398, "runs": 50, "threads": 1}}},
    "deployment": [
        {"name": "original", "file_bytes": 288123, "accuracy": 0.9778, "latency_ms": {"1": 0.0412, "32": 0.733}},
        {"name": "low-rank", "file_bytes": 35012, "accuracy": 0.9722, "latency_ms": {"1": 0.0309, "32": 0.412}},
        {"name": "int8", "file_bytes": 79211, "accuracy": 0.9722, "latency_ms": {"1": 0.0377, "32": 0.521}},
        {"name": "low-rank+int8", "file_bytes": 11876, "accuracy": 0.9667, "latency_ms": {"1": 0.0290, "32": 0.30}}],
}


@pytest.mark.slow
def test_latency_and_int8_rows_appear_when_the_run_has_them(digits_run, tmp_path):
    out, _, _, _ = digits_run
    # compress measures and exports by default: the real run's page has its rows, every number checked.
    real = (out / REPORT_FILE).read_text()
    assert "<h3>Latency</h3>" in real and "Deployed variants" in real
    assert [row["name"] for row in _summary(out)["deployment"]] == ["original", "low-rank"]  # no --int8
    assert check_numbers(_parse(real).items, _summary(out)) > 0
    plain = {k: v for k, v in _summary(out).items() if k not in ("latency_ms", "deployment")}  # --no-export
    page = write_html_report(_write(tmp_path / "plain", "summary.json", json.dumps(plain))).read_text()
    assert "<h3>Latency</h3>" not in page and "Deployed variants" not in page  # absent: nothing drawn
    summary = {**_summary(out), **copy.deepcopy(ISSUE_14_ROWS)}
    page = write_html_report(_write(tmp_path / "deployed", "summary.json", json.dumps(summary))).read_text()
    assert "<h3>Latency</h3>" in page and "Deployed variants" in page
    parsed = _parse(page)
    keys = {key for key, _, _ in parsed.items}
    assert {"/latency_ms/original/1/median", "/latency_ms/compressed/32/median", "/deployment/3/file_bytes",
            "/deployment/2/latency_ms/32", "/deployment/1/accuracy"} <= keys
    for name in ("original", "low-rank", "int8", "low-rank+int8"):
        assert f"<th>{name}</th>" in page
    assert "0.750×" in page  # compressed / original latency at batch 1
    assert "median (p90; fastest call)" in page and "0.398" in page  # the fastest call beside the p90
    check_numbers(parsed.items, summary)


@pytest.mark.slow
def test_apply_and_finetune_write_their_reports(digits_run, tmp_path, capsys):
    out, _, _, weights = digits_run
    common = ["--model", "builtin:digits-cnn", "--weights", str(weights), "--data", "builtin:digits", "--quiet"]
    applied = tmp_path / "applied"
    assert main(["apply", *common, "--plan", str(out / "plan.json"), "--out", str(applied)]) == 0
    summary = _summary(applied)
    page = (applied / REPORT_FILE).read_text()
    parsed = _parse(page)
    assert "/compressed/layers/2/params" in {key for key, _, _ in parsed.items}
    assert check_numbers(parsed.items, summary) >= 18  # the summary, four layer rows and the run, all checked
    assert len(parsed.images) == len(summary["spectra"]) == 4
    assert "only compress searches ranks; this is an apply run" in page
    tuned = tmp_path / "tuned"
    assert main(["finetune", "--model", "builtin:digits-cnn", "--weights", str(applied), "--data", "builtin:digits",
                 "--epochs", "0", "--out", str(tuned), "--quiet"]) == 0
    summary = _summary(tuned)
    parsed = _parse((tuned / REPORT_FILE).read_text())
    keys = {key for key, _, _ in parsed.items}
    assert {"/accuracy/factorized/val", "/accuracy/finetuned/test", "/compressed/macs"} <= keys
    check_numbers(parsed.items, summary)
    quiet = tmp_path / "no-report"
    assert main(["apply", *common, "--plan", str(out / "plan.json"), "--out", str(quiet), "--no-report"]) == 0
    assert not (quiet / REPORT_FILE).exists() and (quiet / "summary.json").is_file()
    capsys.readouterr()


@pytest.mark.slow
def test_without_matplotlib_the_page_keeps_its_tables(digits_run, tmp_path, monkeypatch):
    out, _, _, _ = digits_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import fails
    page = write_html_report(out, out=tmp_path / "plain.html").read_text()
    assert "<img" not in page and page.count("Plots need matplotlib") == 3
    check_numbers(_parse(page).items, _summary(out))


# --------------------------------------------------------------------------- the page in a real browser

@pytest.fixture(scope="module")
def chromium():
    binary, why = find_or_install_chromium()
    if binary is None:
        pytest.skip(f"headless Chromium is not available: {why}")
    return binary


PAGE_STATE = """(() => {
  const box = el => {
    const r = el.getBoundingClientRect();
    return {x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height};
  };
  return {
    scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
    sections: [...document.querySelectorAll('main > section')].map(s => s.id),
    images: [...document.images].map(i => ({complete: i.complete, naturalWidth: i.naturalWidth,
                                            naturalHeight: i.naturalHeight, box: box(i)})),
    numbers: [...document.querySelectorAll('[data-key]')].map(e => [e.dataset.key, e.dataset.value, e.textContent]),
    fontSize: parseFloat(getComputedStyle(document.body).fontSize),
  };
})()"""
VIEWPORTS = (("desktop", 1280, 900, False), ("phone", 390, 844, True))


def _ink(png: bytes) -> float:
    """Fraction of pixels that are not (near) white."""
    import matplotlib.image

    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    return float((pixels.min(axis=-1) < 0.9).mean())


@pytest.mark.slow
def test_report_in_a_real_browser(digits_run, chromium, tmp_path):
    out, _, _, _ = digits_run
    summary = _summary(out)
    with Browser(chromium) as browser:
        for label, width, height, mobile in VIEWPORTS:
            browser.open(out / REPORT_FILE, width=width, height=height, mobile=mobile)
            state = browser.evaluate(PAGE_STATE)
            assert state["sections"] == list(SECTIONS), label
            assert state["scrollWidth"] <= state["innerWidth"], (label, "the page scrolls sideways")
            assert state["fontSize"] >= 14, label
            # Plots present, decoded, drawn at a readable size, and not blank.
            assert len(state["images"]) == len(summary["spectra"]) + sum(
                1 for p in summary["probes"].values() if p["evaluated"]) + 1
            for image in state["images"]:
                assert image["complete"] and image["naturalWidth"] > 200 and image["naturalHeight"] > 100, label
                assert image["box"]["width"] >= min(280, width - 60) and image["box"]["height"] > 120, (label, image)
                assert _ink(browser.screenshot(image["box"])) > 0.02, (label, image)
            # The numbers on the page are summary.json's.
            assert check_numbers(state["numbers"], summary) >= 60
            shot = browser.screenshot()
            assert _ink(shot) > 0.02
            (tmp_path / f"report-{label}.png").write_bytes(shot)
            if ARTIFACTS:
                Path(ARTIFACTS).mkdir(parents=True, exist_ok=True)
                (Path(ARTIFACTS) / f"report-{label}.png").write_bytes(shot)
        assert browser.problems() == []  # no console errors, exceptions, error logs or network requests
