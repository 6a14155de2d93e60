"""Write deploy/k8s/components/monitoring/prometheusrule.yaml from alerts.yml.

    python deploy/prometheus/to_prometheusrule.py          # rewrite the file
    python deploy/prometheus/to_prometheusrule.py --check  # exit 1 if stale

alerts.yml is the source of truth (promtool checks and unit-tests it); the
PrometheusRule carries the same groups for the Prometheus Operator. Needs
PyYAML.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE / "alerts.yml"
TARGET = HERE.parent / "k8s" / "components" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by
# `python deploy/prometheus/to_prometheusrule.py`; edit alerts.yml, not this.
#
# kube-prometheus-stack's Prometheus picks up rules labelled with its Helm
# release (ruleSelector); add that label in your overlay if yours needs it.
"""


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line strings, so PromQL stays readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(alerts_text: str) -> str:
    groups = yaml.safe_load(alerts_text)["groups"]
    rule: dict[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "squire",
            "labels": {"app.kubernetes.io/name": "squire"},
        },
        "spec": {"groups": groups},
    }
    body = yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=1 << 16, allow_unicode=True)
    return HEADER + str(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    text = render(ALERTS.read_text())
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
