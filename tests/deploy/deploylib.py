"""Helpers shared by the tests/deploy checks (Debian's python3 + python3-yaml, nothing else).

Finds the tools (kubectl, yamllint, promtool), renders kustomizations, and pulls metric names
and label names out of PromQL expressions.
"""
import json
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEPLOY = os.path.join(REPO, "deploy")

try:
    import yaml  # python3-yaml (Debian), pulled in by yamllint
except ImportError:  # pragma: no cover - reported as a failure by every check
    yaml = None


class Failures:
    """Collects failures so that one run reports all of them."""

    def __init__(self, name):
        self.name = name
        self.items = []
        self.passed = 0

    def check(self, ok, message):
        if ok:
            self.passed += 1
        else:
            self.items.append(message)
        return ok

    def fail(self, message):
        self.items.append(message)

    def finish(self):
        for m in self.items:
            print(f"FAIL: {m}")
        print(f"{self.name}: {self.passed} checks passed, {len(self.items)} failed")
        return 1 if self.items else 0


def need_yaml():
    if yaml is None:
        print("FAIL: python3-yaml is missing (scripts/install-deps.sh installs it)")
        sys.exit(1)


def tool(name, env_var=None):
    """Path of a tool: $env_var, else PATH. None when absent."""
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    return shutil.which(name)


def run(argv, timeout=120, cwd=None, env=None):
    """Runs argv; returns (exit code, stdout, stderr). Never raises for a non-zero exit."""
    try:
        p = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout, text=True)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        return 124, e.stdout or "", f"timed out after {timeout} s: {' '.join(argv)}"
    except OSError as e:
        return 127, "", str(e)


def kustomization_dirs():
    """Every folder under deploy/ that holds a kustomization.yaml, sorted."""
    out = []
    for root, _dirs, files in os.walk(DEPLOY):
        if "kustomization.yaml" in files:
            out.append(root)
    return sorted(out)


def render(kubectl, path):
    """`kubectl kustomize path` -> (list of objects, error text or None)."""
    code, out, err = run([kubectl, "kustomize", path], timeout=120)
    if code != 0:
        return None, err.strip() or f"exit {code}"
    docs = [d for d in yaml.safe_load_all(out) if d]
    return docs, None


# ---- PromQL -----------------------------------------------------------------------------------

_KEYWORDS = {
    # aggregation operators and modifiers
    "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "and", "or", "unless", "offset", "atan2", "inf", "nan", "Inf", "NaN",
}
# Series Prometheus makes itself, not exported by our binaries.
PROMETHEUS_MADE = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS",
                   "ALERTS_FOR_STATE"}
# Labels that the scrape adds (target labels), never in our /metrics output.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint",
                 "node", "__name__"}


def _blank_strings(expr):
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return re.sub(r"'(?:[^'\\]|\\.)*'", "''", expr)


def promql_references(expr):
    """(metric name -> set of label names in its matchers, set of grouping label names).

    Handles what our dashboards and rules use: selectors, ranges, subqueries, functions,
    aggregations with by/without, vector matching, Grafana variables ($__rate_interval,
    $namespace) and prometheus-adapter's <<.LabelMatchers>>.
    """
    s = expr.replace("<<.LabelMatchers>>", "")
    s = re.sub(r"\$\{?\w+\}?", "5m", s)
    # Label matchers: remember them per position before blanking the strings inside.
    metrics = {}
    grouping = set()
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", s):
        grouping.update(x.strip() for x in m.group(2).split(",") if x.strip())
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges and subqueries
    blanked = _blank_strings(s)
    pos = 0
    token = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
    while True:
        m = token.search(blanked, pos)
        if not m:
            break
        name = m.group(0)
        start, end = m.span()
        pos = end
        if start > 0 and (blanked[start - 1].isdigit() or blanked[start - 1] == "."):
            continue  # part of a number such as 1e3 or a duration such as 5m
        rest = blanked[end:].lstrip()
        if rest.startswith("("):
            continue  # a function or an aggregation
        if name in _KEYWORDS:
            continue
        labels = set()
        if rest.startswith("{"):
            close = rest.index("}")
            body = rest[1:close]
            labels = {k for k, _op in re.findall(r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)", body)}
            pos = end + (len(blanked[end:]) - len(rest)) + close + 1
        metrics.setdefault(name, set()).update(labels)
    return metrics, grouping


def dashboard_exprs(path):
    """[(panel title, expr)] of every target of every panel (rows' nested panels too)."""
    with open(path) as f:
        dash = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []) or []:
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []) or [])

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and isinstance(q, str):
            m = re.match(r"label_values\((\w+)", q)
            if m:
                out.append((f"variable {v.get('name')}", m.group(1)))
    return out


def rule_exprs(path):
    """[(rule name, expr)] of a plain rules file or of a PrometheusRule's spec."""
    with open(path) as f:
        doc = yaml.safe_load(f)
    if doc.get("kind") == "PrometheusRule":
        doc = doc["spec"]
    out = []
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            out.append((r.get("alert") or r.get("record"), r["expr"]))
    return out


def autoscaling_exprs():
    """[(where, expr)] of the KEDA trigger queries and the prometheus-adapter rules."""
    out = []
    so = os.path.join(DEPLOY, "autoscaling", "keda", "scaledobject.yaml")
    with open(so) as f:
        for doc in yaml.safe_load_all(f):
            for t in (doc or {}).get("spec", {}).get("triggers", []):
                if t.get("type") == "prometheus":
                    out.append(("KEDA ScaledObject", t["metadata"]["query"]))
    values = os.path.join(DEPLOY, "autoscaling", "hpa", "prometheus-adapter-values.yaml")
    with open(values) as f:
        doc = yaml.safe_load(f)
    for kind in ("custom", "external"):
        for r in doc.get("rules", {}).get(kind, []) or []:
            out.append(("prometheus-adapter seriesQuery", r["seriesQuery"]))
            out.append(("prometheus-adapter metricsQuery", r["metricsQuery"]))
    return out


def all_deploy_exprs():
    """Every PromQL expression in deploy/: dashboard, alert rules, autoscaling."""
    exprs = [("dashboard: " + t, e) for t, e in
             dashboard_exprs(os.path.join(DEPLOY, "monitoring", "grafana-dashboard.json"))]
    exprs += [("alert " + n, e) for n, e in rule_exprs(os.path.join(DEPLOY, "prometheus",
                                                                      "alerts.yaml"))]
    exprs += [("PrometheusRule " + n, e) for n, e in
              rule_exprs(os.path.join(DEPLOY, "monitoring", "prometheus-rule.yaml"))]
    exprs += autoscaling_exprs()
    return exprs


# ---- Prometheus text format -------------------------------------------------------------------

def parse_exposition(text):
    """{family name: {"type": t, "series": [label dict, ...]}} from a /metrics page."""
    fams = {}
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ", 3)
            types[name] = typ
            fams.setdefault(name, {"type": typ, "series": []})
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+\S+")
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = sample.match(line)
        if not m:
            continue
        name = m.group(1)
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                family = name[: -len(suffix)]
        labels = dict(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        fams.setdefault(family, {"type": types.get(family, "untyped"), "series": []})
        fams[family]["series"].append(labels)
    return fams


def resolve_metric(name, fams):
    """The exported family a referenced name means (histogram suffixes allowed), or None."""
    if name in fams:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if fams.get(base, {}).get("type") == "histogram":
                return base
    return None
