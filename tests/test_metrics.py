"""Tests for ingest.metrics: one registry per :class:`Metrics`, and the README "Metrics" section.

The README lists every metric ``/metrics`` exposes (as Prometheus names: counters with ``_total``) with
its labels; the test reads that list and checks it is exactly what :class:`Metrics` registers.
"""

from __future__ import annotations

import re

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest

from ingest.metrics import Metrics
from tests import REPO

_NAME = re.compile(r"((?:[a-z0-9_]|\{[a-z0-9_,]+\}(?=[a-z0-9_]))+)(?:\{([^}]*)\})?")


def _expand(name: str) -> list[str]:
    """``ingest_instances_{received,accepted}_total`` -> both names."""
    group = re.search(r"\{([^}]*)\}", name)
    if group is None:
        return [name]
    head, tail = name[: group.start()], name[group.end() :]
    return [full for choice in group.group(1).split(",") for full in _expand(head + choice + tail)]


def _documented() -> dict[str, set[str]]:
    """Metric name -> label names, from the README "Metrics" section."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^### Metrics\n(.*?)(?=^#)", readme, re.S | re.M)
    assert section is not None, 'README has no "### Metrics" section'
    names: dict[str, set[str]] = {}
    for token in re.findall(r"`(ingest_[^`]*)`", section.group(1)):
        match = _NAME.fullmatch(token)
        assert match is not None, token
        labels = {part.split("=")[0].strip() for part in (match.group(2) or "").split(",") if part.strip()}
        for name in _expand(match.group(1)):
            names.setdefault(name, set()).update(labels)
    return names


def _registered(metrics: Metrics) -> dict[str, Counter | Gauge | Histogram]:
    """Prometheus name -> metric object, for every metric held by ``metrics``."""
    found: dict[str, Counter | Gauge | Histogram] = {}
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram):
            (family,) = value.describe()
            found[f"{family.name}_total" if family.type == "counter" else family.name] = value
    return found


def test_readme_lists_exactly_the_registered_metrics() -> None:
    metrics = Metrics()
    registered = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in metrics.registry.collect()
        if family.name.startswith("ingest_")
    }
    assert set(_documented()) == registered
    assert set(_registered(metrics)) == registered  # every family is reachable from Metrics


def test_readme_labels_are_the_registered_labels() -> None:
    metrics = Metrics()
    objects = _registered(metrics)
    for name, labels in _documented().items():
        metric = objects[name]
        # an unlabelled metric is used as it is (a labelled one refuses inc/set without labels)
        child = metric.labels(**{label: "documented" for label in labels}) if labels else metric
        if isinstance(child, Histogram):
            child.observe(0.5)
            assert f"{name}_count 1.0" in metrics.render().decode(), name
            continue
        if isinstance(child, Counter):
            child.inc()
        else:
            child.set(1)
        shown = ",".join(f'{label}="documented"' for label in sorted(labels))
        assert (f"{name}{{{shown}}} 1.0" if labels else f"{name} 1.0") in metrics.render().decode(), name


def test_render_exposes_every_documented_metric_before_anything_is_counted() -> None:
    text = Metrics().render().decode()
    for name in _documented():
        assert re.search(rf"^# TYPE {name} (counter|gauge|histogram)$", text, re.M), name


def test_no_created_series_and_the_process_metrics_are_exported() -> None:
    metrics = Metrics()
    metrics.studies.labels(result="created").inc()
    metrics.push_seconds.observe(0.2)
    text = metrics.render().decode()
    # a ``_created`` sample holds a Unix time and reads like a count in a scrape
    assert "_created" not in text
    assert 'ingest_studies_total{result="created"} 1.0' in text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "python_info"):
        assert re.search(rf"^{name}[ {{]", text, re.M), name


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # the global registry would refuse the second set of names
    first.instances_rejected.labels(reason="not_dicom").inc()
    first.spool_bytes.set(4096)
    assert 'ingest_instances_rejected_total{reason="not_dicom"} 1.0' in first.render().decode()
    assert "ingest_spool_bytes 4096.0" in first.render().decode()
    assert "not_dicom" not in second.render().decode()
    assert "ingest_spool_bytes 0.0" in second.render().decode()
    assert b"ingest_" not in generate_latest(REGISTRY)
