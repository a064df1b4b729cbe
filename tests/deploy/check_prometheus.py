#!/usr/bin/env python3
"""deploy_prometheus: the alert rules, their unit tests, the scrape configuration and the Grafana
dashboard are valid for Prometheus (promtool), agree with each other, and each alert fires in
a unit test and has a runbook in docs/operations.md.

  check_prometheus.py [--promtool PATH]
  check_prometheus.py --sync     rewrite deploy/monitoring/prometheus-rule.yaml from
                                 deploy/prometheus/alerts.yaml
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402

ALERTS = os.path.join(dl.DEPLOY, "prometheus", "alerts.yaml")
ALERTS_TEST = os.path.join(dl.DEPLOY, "prometheus", "alerts_test.yaml")
PROM_CONFIG = os.path.join(dl.DEPLOY, "prometheus", "prometheus.yml")
RULE_CR = os.path.join(dl.DEPLOY, "monitoring", "prometheus-rule.yaml")
DASHBOARD = os.path.join(dl.DEPLOY, "monitoring", "grafana-dashboard.json")
OPERATIONS = os.path.join(dl.REPO, "docs", "operations.md")

RULE_CR_HEADER = """\
# The alert rules of deploy/prometheus/alerts.yaml as a Prometheus Operator PrometheusRule.
# Generated: edit alerts.yaml, then run `python3 tests/deploy/check_prometheus.py --sync`
# (tests/deploy fails while the two differ). Runbooks: docs/operations.md ("Alerts").
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: perfusion-serve
  labels:
    app.kubernetes.io/part-of: perfusion-serve
    # kube-prometheus-stack's default ruleSelector matches its release label: add it if needed.
    role: alert-rules
spec:
"""


def sync():
    with open(ALERTS) as f:
        lines = f.read().split("\n")
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    body = "\n".join(("  " + l if l.strip() else l) for l in lines).rstrip() + "\n"
    with open(RULE_CR, "w") as f:
        f.write(RULE_CR_HEADER + body)
    print(f"wrote {os.path.relpath(RULE_CR, dl.REPO)}")


def anchors(markdown_path):
    """GitHub-style anchors of the headings of a Markdown file."""
    out = set()
    if not os.path.exists(markdown_path):
        return out
    with open(markdown_path) as f:
        for line in f:
            m = re.match(r"#+\s+(.*)", line)
            if m:
                a = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
                out.add(a)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--promtool", default=dl.tool("promtool", "PROMTOOL"))
    ap.add_argument("--sync", action="store_true")
    args = ap.parse_args()
    dl.need_yaml()
    if args.sync:
        sync()
        return 0
    f = dl.Failures("deploy_prometheus")
    if not args.promtool:
        f.fail("promtool is needed (scripts/install-deps.sh installs Debian's prometheus)")
        return f.finish()

    # 1. Rules are valid, and the PrometheusRule carries exactly the same groups.
    code, out, err = dl.run([args.promtool, "check", "rules", ALERTS])
    f.check(code == 0, f"promtool check rules alerts.yaml:\n{out}{err}")
    with open(ALERTS) as a, open(RULE_CR) as b:
        plain, cr = dl.yaml.safe_load(a), dl.yaml.safe_load(b)
    f.check(cr.get("kind") == "PrometheusRule" and cr.get("spec") == plain,
            "deploy/monitoring/prometheus-rule.yaml differs from deploy/prometheus/alerts.yaml: "
            "run `python3 tests/deploy/check_prometheus.py --sync`")

    # 2. Unit tests pass, and every alert fires in at least one of them.
    code, out, err = dl.run([args.promtool, "test", "rules", ALERTS_TEST], cwd=os.path.dirname(
        ALERTS_TEST))
    f.check(code == 0, f"promtool test rules alerts_test.yaml:\n{out}{err}")
    with open(ALERTS_TEST) as t:
        tests = dl.yaml.safe_load(t)
    fired = {c["alertname"] for test in tests.get("tests", [])
             for c in test.get("alert_rule_test", []) if c.get("exp_alerts")}
    rules = [r for g in plain["groups"] for r in g["rules"] if "alert" in r]
    runbooks = anchors(OPERATIONS)
    for r in rules:
        name = r["alert"]
        f.check(name in fired, f"alert {name} never fires in alerts_test.yaml")
        f.check(r.get("labels", {}).get("severity") in ("critical", "warning", "info"),
                f"alert {name}: labels.severity must be critical, warning or info")
        ann = r.get("annotations", {})
        f.check(ann.get("summary") and ann.get("description"),
                f"alert {name}: needs summary and description annotations")
        url = ann.get("runbook_url", "")
        m = re.match(r"docs/operations\.md#(.+)$", url)
        f.check(bool(m) and m.group(1) in runbooks,
                f"alert {name}: runbook_url {url!r} is not a heading of docs/operations.md")

    # 3. The scrape configuration. Debian's promtool is built without Kubernetes discovery, so
    #    the check runs on a copy whose kubernetes_sd_configs are replaced by static targets.
    with open(PROM_CONFIG) as pc:
        config = dl.yaml.safe_load(pc)
    jobs = [j["job_name"] for j in config.get("scrape_configs", [])]
    for j in config.get("scrape_configs", []):
        if "kubernetes_sd_configs" in j:
            del j["kubernetes_sd_configs"]
            j["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "prometheus.yml"), "w") as out_f:
            dl.yaml.safe_dump(config, out_f)
        shutil.copy(ALERTS, os.path.join(tmp, "alerts.yaml"))
        code, out, err = dl.run([args.promtool, "check", "config", "prometheus.yml"], cwd=tmp)
        f.check(code == 0, f"promtool check config prometheus.yml (static copy):\n{out}{err}")
    used_jobs = set()
    for _, expr in dl.rule_exprs(ALERTS):
        used_jobs.update(re.findall(r'job="([^"]+)"', expr))
    for j in used_jobs:
        f.check(j in jobs, f"alerts use job={j!r}, which prometheus.yml does not define ({jobs})")

    # 4. The dashboard: well-formed, and every query parses (as recording rules for promtool).
    with open(DASHBOARD) as d:
        dash = json.load(d)
    ids = []
    panels = []

    def walk(ps):
        for p in ps:
            panels.append(p)
            walk(p.get("panels", []) or [])

    walk(dash.get("panels", []))
    for p in panels:
        ids.append(p.get("id"))
        f.check("gridPos" in p and "type" in p and p.get("title"),
                f"dashboard panel {p.get('id')}: needs type, title and gridPos")
        if p.get("type") != "row":
            f.check(p.get("targets"), f"dashboard panel {p.get('title')!r}: no queries")
            refs = [t.get("refId") for t in p.get("targets", [])]
            f.check(len(refs) == len(set(refs)), f"panel {p.get('title')!r}: duplicate refIds")
            f.check(p.get("description"), f"dashboard panel {p.get('title')!r}: no description")
    f.check(len(ids) == len(set(ids)), "dashboard: duplicate panel ids")
    variables = {v.get("name") for v in dash.get("templating", {}).get("list", [])}
    f.check("datasource" in variables, "dashboard: no datasource variable")
    f.check(dash.get("uid") and dash.get("title"), "dashboard: needs uid and title")
    exprs = [(w, e) for w, e in dl.all_deploy_exprs() if not w.startswith("prometheus-adapter")]
    # Store-wide gauges: every server replica reports the same whole-store count, so a query must
    # take one value per namespace (max by (namespace ...)) before it adds anything up, or it shows
    # the count times the replicas: no sum() or count() straight over one.
    store_wide = ("perfusion_training_queue_depth", "perfusion_training_jobs",
                  "perfusion_concepts_stored", "perfusion_concept_bytes_stored")
    for where, expr in exprs:
        for metric in store_wide:
            for m in re.finditer(r"(\w+)(?:\s+by\s*\(([^)]*)\))?\s*\(\s*" + metric + r"\b", expr):
                f.check(m.group(1) not in ("sum", "count"),
                        f"{where}: {metric} is store-wide (each server replica reports it): "
                        f"take max by (namespace) of it before {m.group(1)}()")
    rules = []
    for i, (where, expr) in enumerate(exprs):
        e = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
        e = re.sub(r"\$\{?(\w+)\}?", lambda m: ".*" if m.group(1) in variables else m.group(0), e)
        rules.append({"record": f"deploy_check:expr_{i}", "expr": e})
    for i, (where, expr) in enumerate(dl.autoscaling_exprs()):
        if where.endswith("metricsQuery"):
            rules.append({"record": f"deploy_check:adapter_{i}",
                          "expr": expr.replace("<<.LabelMatchers>>", 'namespace="perfusion"')})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        dl.yaml.safe_dump({"groups": [{"name": "deploy-check", "rules": rules}]}, tmp)
    code, out, err = dl.run([args.promtool, "check", "rules", tmp.name])
    os.unlink(tmp.name)
    f.check(code == 0, f"a dashboard or autoscaling query does not parse:\n{out}{err}")
    print(f"checked {len(rules)} dashboard/autoscaling queries, {len(plain['groups'][0]['rules'])}"
          f" alert rules, {len(panels)} panels")
    return f.finish()


if __name__ == "__main__":
    sys.exit(main())
