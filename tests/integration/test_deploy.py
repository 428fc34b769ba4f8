"""deploy/: alert rules, the Grafana dashboard and the Kubernetes manifests agree with what kgate exports,
serves and accepts.

- every metric (and label) named in alerts.yml, alerts_test.yml and the dashboard's PromQL is one that
  :class:`gateway.metrics.series.Metrics` exports;
- ``promtool check rules`` / ``test rules`` / ``check config`` pass, and every dashboard expression parses
  (skipped, with the reason, when promtool is not on PATH: ``apt-get install prometheus`` provides it);
- the manifests are consistent: selectors, named ports, probe paths among the app's routes, the policy in
  the ConfigMap validates, every secret/env the policy names is wired, the grace period covers the drain;
  and they are valid Kubernetes objects when ``kubernetes-validate`` is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.metrics.series import Metrics
from gateway.policy.config import Config, load_config, parse_listen

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
ALERTS = PROM / "alerts.yml"
ALERTS_TEST = PROM / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "kgate-dashboard.json"
K8S = DEPLOY / "kubernetes"
README = DEPLOY / "README.md"

# Labels Prometheus attaches to every scraped series (target labels), and histogram buckets' `le`.
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
# Dashboard template variables, replaced by values that keep the PromQL valid.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": ".+", "$model": ".*",
                "$tier": ".*"}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (apt-get install prometheus; .ci/run does)")

_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_KGATE_NAME = re.compile(r"\bkgate_[a-zA-Z0-9_]+\b")
_LABEL_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return Metrics(process_metrics=False)


def _family(metrics: Metrics, sample: str) -> str | None:
    """The family a sample name belongs to (histogram suffixes stripped), or None if kgate has none."""
    if sample in metrics.specs:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample.removesuffix(suffix)
        if base != sample and base in metrics.specs and metrics.specs[base].type == "histogram":
            return base
    return None


def check_promql(metrics: Metrics, expr: str, where: str, allow: frozenset[str] = frozenset()) -> list[str]:
    """Problems with one expression: unknown metric names, unknown labels in selectors and groupings."""
    problems = []
    all_labels = set().union(*(s.labels for s in metrics.specs.values())) | TARGET_LABELS | {"le"}
    for name in _KGATE_NAME.findall(expr):
        if _family(metrics, name) is None:
            problems.append(f"{where}: metric {name!r} is not exported by gateway.metrics.series.Metrics")
    for name, matchers in _SELECTOR.findall(expr):
        if name in ("by", "without", "on", "ignoring") or name in allow:
            continue
        fam = _family(metrics, name)
        if fam is None:
            problems.append(f"{where}: selector {name!r} names no kgate metric")
            continue
        known = set(metrics.specs[fam].labels) | TARGET_LABELS
        if name.endswith("_bucket"):
            known.add("le")
        for label in _LABEL_MATCHER.findall(matchers):
            if label not in known:
                problems.append(f"{where}: {name} has no label {label!r}")
    for group in _GROUPING.findall(expr):
        for label in (x.strip() for x in group.split(",")):
            if label and label not in all_labels:
                problems.append(f"{where}: grouping label {label!r} is on no kgate metric")
    return problems


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


# ---------------------------------------------------------------------------------------------- alerts
def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_use_only_exported_metrics_and_labels(metrics: Metrics) -> None:
    problems = [p for r in alert_rules() for p in check_promql(metrics, r["expr"], r["alert"])]
    assert not problems, "\n".join(problems)


def test_alert_rules_are_complete_and_have_runbooks() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    anchors = {_slug(m) for m in re.findall(r"^#+\s+(.+)$", README.read_text(), flags=re.M)}
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert {"summary", "description", "runbook"} <= set(r["annotations"]), r["alert"]
        path, _, anchor = r["annotations"]["runbook"].partition("#")
        assert path == "deploy/README.md" and anchor in anchors, f"{r['alert']}: no heading for {anchor!r}"
    # What the brief asks to be alerted on, each by at least one rule.
    exprs = " ".join(r["expr"] for r in rules)
    for metric in ("kgate_store_errors_total", 'decision=~"denied', "kgate_holds_outstanding",
                   "kgate_spool_depth_records", "kgate_upstream_errors_total",
                   "kgate_k_above_evaluated_total", "kgate_audit_write_errors_total", "kgate_ready"):
        assert metric in exprs, f"no alert on {metric}"
    assert "deriv(kgate_holds_outstanding" in exprs  # "growing", not only "too high"


def test_alert_unit_tests_cover_real_alerts_and_metrics(metrics: Metrics) -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    names = {r["alert"] for r in alert_rules()}
    tested = {t["alertname"] for case in doc["tests"] for t in case.get("alert_rule_test", [])}
    assert tested <= names, f"tests of unknown alerts: {tested - names}"
    assert len(tested) >= 3
    problems = [p for case in doc["tests"] for s in case["input_series"]
                for p in check_promql(metrics, s["series"], case["name"], allow=frozenset({"up"}))]
    assert not problems, "\n".join(problems)


@needs_promtool
def test_promtool_check_rules() -> None:
    _promtool("check", "rules", ALERTS.name)


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    _promtool("test", "rules", ALERTS_TEST.name)


@needs_promtool
def test_promtool_check_example_config() -> None:
    _promtool("check", "config", "prometheus.yml")


def _promtool(*args: str, cwd: Path = PROM) -> None:
    assert PROMTOOL is not None
    proc = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


# ------------------------------------------------------------------------------------------- dashboard
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])  # inside collapsed rows


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(f"{p['title']}/{t['refId']}", t["expr"])
            for p in panels(dashboard()) for t in p.get("targets", [])]


def _substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    return expr


def test_dashboard_uses_only_exported_metrics_and_labels(metrics: Metrics) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    problems = [p for where, e in exprs for p in check_promql(metrics, e, where)]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            problems += check_promql(metrics, var["query"]["query"], f"variable {var['name']}")
    assert not problems, "\n".join(problems)


def test_dashboard_structure() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}"
    titles = {p["title"] for p in panels(d)}
    for wanted in ("Request rate by decision", "Denials by rule", "Tokens by kind", "FLOPs rate",
                   "K distribution", "K quantiles", "K above evaluated", "Upstream latency p50 / p99",
                   "Gateway overhead p50 / p99", "Store latency p50 / p99", "Store errors",
                   "Holds outstanding", "Spool depth", "Audit write errors"):
        assert wanted in titles, f"missing panel {wanted!r}"
    heat = next(p for p in panels(d) if p["title"] == "K distribution")
    assert heat["type"] == "heatmap" and heat["targets"][0]["format"] == "heatmap"


@needs_promtool
def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as a recording rule), with Grafana's variables filled in."""
    rules = [{"record": f"kgate_dashboard:expr_{i}", "expr": _substitute(e)}
             for i, (_, e) in enumerate(dashboard_exprs())]
    doc = {"groups": [{"name": "dash", "rules": rules}]}
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(doc))
    _promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)


# ----------------------------------------------------------------------------------------- kubernetes
def k8s_docs(*, include_optional: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    files = sorted(K8S.glob("*.yaml"))
    if include_optional:
        files += sorted((K8S / "optional").glob("*.yaml"))
    return [(f, d) for f in files for d in yaml.safe_load_all(f.read_text()) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for f, d in k8s_docs() if d["kind"] == kind and f.name != "secret.example.yaml"]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The ConfigMap's policy, validated by the real loader (as `kgate policy check` would)."""
    f = tmp_path_factory.mktemp("policy") / "kgate.yaml"
    f.write_text(one("ConfigMap", "kgate-policy")["data"]["kgate.yaml"])
    return load_config(f)


@pytest.fixture(scope="module")
def container() -> dict[str, Any]:
    containers = one("Deployment", "kgate")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def test_every_manifest_has_the_basics() -> None:
    docs = k8s_docs()
    assert docs
    for f, d in docs:
        where = f"{f.relative_to(DEPLOY)}"
        if d.get("kind") == "Kustomization":
            continue
        assert d.get("apiVersion") and d.get("kind"), where
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), where


def test_kustomization_lists_every_manifest_but_the_examples() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {f.name for f in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present
    assert kust["namespace"] == one("Namespace")["metadata"]["name"]


def test_deployment_probes_and_shutdown(container: dict[str, Any], policy: Config) -> None:
    deploy = one("Deployment", "kgate")
    spec = deploy["spec"]
    pod = spec["template"]
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == parse_listen(policy.server.listen)[1]
    assert ports["admin"] == parse_listen(policy.server.admin_listen)[1]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    routes = app_routes(policy)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes, f"{probe} path {get['path']} is not a route of the app"
        assert get["port"] in ports or get["port"] in ports.values()
    ann = pod["metadata"]["annotations"]
    # /metrics is served on the admin listener (server.metrics_on_client_port is false by default)
    assert int(ann["prometheus.io/port"]) == ports["admin"] and ann["prometheus.io/path"] == "/metrics"
    assert not policy.server.metrics_on_client_port
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + policy.server.drain_seconds + 5, "grace period shorter than drain"


def app_routes(config: Config) -> set[str]:
    """The GET routes of the real client-facing app built from ``config`` (nothing is started)."""
    from gateway.proxy.app import create_app

    app = create_app(config, metrics=Metrics(process_metrics=False))
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource}


def test_config_arguments_and_mounts_agree(container: dict[str, Any]) -> None:
    args = container["args"]
    assert args[0] == "serve"
    config_path = Path(args[args.index("--config") + 1])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in one("Deployment", "kgate")["spec"]["template"]["spec"]["volumes"]}
    policy_mount = next(m for m in mounts.values() if config_path.parent == Path(m["mountPath"]))
    assert "subPath" not in policy_mount, "a subPath mount never sees ConfigMap updates"
    cm = volumes[policy_mount["name"]]["configMap"]["name"]
    assert config_path.name in one("ConfigMap", cm)["data"]
    assert args[args.index("--store") + 1] == "$(KGATE_STORE_URL)"
    # a read-only root needs every writable path the policy uses on a volume
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_policy_state_paths_are_on_writable_volumes(container: dict[str, Any], policy: Config) -> None:
    writable = [Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")]
    for path in (policy.store.data_dir, policy.audit.dir):
        assert any(Path(path).is_relative_to(w) for w in writable), f"{path} is not on a writable volume"


def test_every_secret_the_policy_names_is_wired(container: dict[str, Any], policy: Config) -> None:
    env = {e["name"]: e for e in container["env"]}
    wanted = {policy.server.admin_token_env, "KGATE_STORE_URL"}
    wanted |= {u.api_key_env for u in policy.upstreams.values() if u.api_key_env}
    if policy.audit.hmac_key_env:
        wanted.add(policy.audit.hmac_key_env)
    assert wanted <= env.keys(), f"not in the Deployment's env: {wanted - env.keys()}"
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == example["metadata"]["name"]
            assert ref["key"] in example["stringData"], f"{ref['key']} missing from secret.example.yaml"
    for required in ("KGATE_STORE_URL", policy.server.admin_token_env):
        assert not env[required]["valueFrom"]["secretKeyRef"].get("optional", False)


def test_services_pdb_and_network_policy_select_the_pods(container: dict[str, Any]) -> None:
    pod_labels = one("Deployment", "kgate")["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}
    services = by_kind("Service")
    assert {s["metadata"]["name"] for s in services} >= {"kgate", "kgate-admin", "kgate-pods"}
    for svc in services:
        assert svc["spec"]["selector"].items() <= pod_labels.items(), svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names, f"{svc['metadata']['name']}: unknown port {p['targetPort']}"
    assert "admin" not in {p["targetPort"] for p in one("Service", "kgate")["spec"]["ports"]}
    pods_svc = one("Service", "kgate-pods")["spec"]
    assert pods_svc["clusterIP"] == "None" and pods_svc["publishNotReadyAddresses"] is True
    pdb = one("PodDisruptionBudget", "kgate")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    netpol = one("NetworkPolicy", "kgate")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    for rule in netpol["spec"]["ingress"]:
        for p in rule["ports"]:
            assert p["port"] in port_names
    monitor = one("ServiceMonitor", "kgate")
    matching = [s for s in services
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in matching] == ["kgate-pods"], "each pod must be scraped once"


def test_prometheus_example_scrapes_the_headless_service() -> None:
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "kgate")
    name = job["dns_sd_configs"][0]["names"][0]
    svc, ns = name.split(".")[:2]
    assert svc == "kgate-pods" and ns == one("Namespace")["metadata"]["name"]
    assert job["dns_sd_configs"][0]["port"] == one("Service", "kgate-pods")["spec"]["ports"][0]["port"]
    assert prom["rule_files"] == ["alerts.yml"]


def test_manifests_are_valid_kubernetes_objects() -> None:
    kv = pytest.importorskip("kubernetes_validate",
                             reason="pip install kubernetes-validate for Kubernetes schema checks")
    docs = [(f, d) for f, d in k8s_docs(include_optional=False) if d["kind"] != "Kustomization"]
    for version in ("1.27.0", kv.latest_version()):
        for f, d in docs:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as exc:  # pragma: no cover - the message is the point
                pytest.fail(f"{f.name} ({d['kind']}) is not valid for Kubernetes {version}: {exc}")


def test_dockerfile_matches_the_deployment(container: dict[str, Any]) -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    user = re.search(r"^USER\s+(\d+)", text, flags=re.M)
    assert user and int(user.group(1)) == \
        one("Deployment", "kgate")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, flags=re.M) for p in line.split()}
    assert exposed == {p["containerPort"] for p in container["ports"]}
    for src in re.findall(r"^COPY\s+(?!--from)(\S+)", text, flags=re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


def test_readme_documents_every_metric(metrics: Metrics) -> None:
    text = README.read_text()
    missing = [name for name in metrics.specs if f"`{name}`" not in text]
    assert not missing, f"deploy/README.md does not document {missing}"
