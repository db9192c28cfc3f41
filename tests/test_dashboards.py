"""dashboards/: generated Grafana JSON is current, well-formed, and charts exactly the registry."""
from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

from ark_ray.metrics import REGISTRY

SERIES = re.compile(r"\bray_(ark_[a-z0-9_]+)")


@pytest.fixture(scope="module")
def build(repo_root):
    spec = importlib.util.spec_from_file_location("ark_dashboards_build", repo_root / "dashboards" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def committed(repo_root, build):
    return {fname: json.loads((repo_root / "dashboards" / fname).read_text()) for fname in build.DASHBOARDS}


def metric_of(series: str) -> str:
    """ark_x_bucket -> ark_x for histograms; anything else must be a registry name as is."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = series[: -len(suffix)]
        if series.endswith(suffix) and base in REGISTRY and REGISTRY[base].kind == "histogram":
            return base
    return series


def exprs(dash: dict):
    for panel in dash["panels"]:
        for t in panel["targets"]:
            yield panel, t["expr"]


def test_committed_json_equals_generator_output(repo_root, build):
    for fname, d in build.DASHBOARDS.items():
        assert (repo_root / "dashboards" / fname).read_text() == build.dumps(d), \
            f"{fname} is stale: run python dashboards/build.py"
    assert build.main(["--check"]) == 0


def test_check_mode_notices_a_stale_file(tmp_path, build):
    build.main(["--out", str(tmp_path)])
    assert build.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "ark_serve.json").write_text("{}\n")
    assert build.main(["--check", "--out", str(tmp_path)]) == 1


def test_dashboard_structure(committed):
    uids = set()
    for fname, d in committed.items():
        assert d["uid"] and d["uid"] not in uids
        uids.add(d["uid"])
        assert d["title"] and isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
        names = [v["name"] for v in d["templating"]["list"]]
        assert names[:2] == ["datasource", "SessionName"]
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and d["panels"]
        for p in d["panels"]:
            assert p["title"] and p["type"] in ("timeseries", "stat")
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            g = p["gridPos"]
            assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24
            assert p["targets"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs))
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"] and t["expr"]


def test_promql_is_balanced_and_session_filtered(committed):
    for d in committed.values():
        for panel, e in exprs(d):
            for o, c in ("()", "{}", "[]"):
                assert e.count(o) == e.count(c), (panel["title"], e)
            # every selector of one of our series carries the session filter
            for m in re.finditer(r"ray_ark_[a-z0-9_]+(\{[^}]*\})?", e):
                assert m.group(1) and 'SessionName=~"$SessionName"' in m.group(1), e


def test_every_panel_metric_exists_and_every_metric_has_a_panel(committed):
    charted = set()
    for fname, d in committed.items():
        area = fname.removeprefix("ark_").removesuffix(".json")
        for panel, e in exprs(d):
            found = [metric_of(s) for s in SERIES.findall(e)]
            assert found, (panel["title"], e)
            for name in found:
                assert name in REGISTRY, f"{fname} / {panel['title']}: {name} is not in ark_ray.metrics"
                assert REGISTRY[name].area == area, f"{name} charted on the {area} dashboard"
                if REGISTRY[name].kind == "histogram":
                    assert re.search(rf"ray_{name}_(bucket|sum|count)\b", e), e
            charted.update(found)
    assert charted == set(REGISTRY), f"no panel for: {sorted(set(REGISTRY) - charted)}"


def test_counters_are_charted_as_rates_or_totals(committed):
    """A counter only means something through rate/increase or as a running total (stat panels)."""
    for d in committed.values():
        for panel, e in exprs(d):
            for name in map(metric_of, SERIES.findall(e)):
                if REGISTRY[name].kind == "counter" and panel["type"] == "timeseries":
                    assert re.search(rf"(rate|increase)\(ray_{name}\{{", e) or e.startswith("sum(ray_"), e


def test_selector_helper_rejects_unknown_metrics(build):
    with pytest.raises(KeyError):
        build.m("ark_opd_nothing")
    with pytest.raises(ValueError):
        build.m("ark_opd_loss", "_bucket")
