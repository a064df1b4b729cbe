#!/usr/bin/env python3
"""deploy_manifests: every kustomization under deploy/ renders with `kubectl kustomize`, the
YAML passes yamllint, and each rendered object has what Kubernetes and this service need:
selectors that match pod labels, probes, resources, mounts that name existing volumes and
objects, GPU limits, a grace period longer than the server's drain, and scrape and scaling
targets that exist.

  check_manifests.py [--kubectl PATH] [--yamllint PATH]
"""
import argparse
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402

# Objects the gpu overlay expects to exist in the cluster (created out of band, docs/deploy.md).
EXTERNAL = {("Secret", "perfusion-tokens")}
NAMESPACED = {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim",
              "ServiceMonitor", "PrometheusRule", "ScaledObject", "HorizontalPodAutoscaler"}
HANDLERS = ("grpc", "httpGet", "tcpSocket", "exec")


def flags_of(configmaps, key):
    """{flag: value} of the flag file `key` in any rendered ConfigMap."""
    for cm in configmaps:
        text = (cm.get("data") or {}).get(key)
        if text is None:
            continue
        flags = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = re.match(r"--([A-Za-z0-9_]+)(?:=(.*))?$", line)
            if m:
                flags[m.group(1)] = m.group(2) if m.group(2) is not None else "true"
        return flags
    return None


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_deployment(f, where, d, by_kind):
    name = d["metadata"]["name"]
    spec = d.get("spec", {})
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    tmpl = spec.get("template", {})
    labels = (tmpl.get("metadata") or {}).get("labels") or {}
    f.check(bool(sel), f"{where}: Deployment {name}: spec.selector.matchLabels is empty")
    f.check(matches(sel, labels),
            f"{where}: Deployment {name}: selector {sel} does not match pod labels {labels}")
    pod = tmpl.get("spec", {})
    f.check(pod.get("securityContext", {}).get("runAsNonRoot") is True,
            f"{where}: Deployment {name}: pod securityContext.runAsNonRoot is not true")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    containers = pod.get("containers", [])
    f.check(bool(containers), f"{where}: Deployment {name}: no containers")
    for c in containers:
        cw = f"{where}: Deployment {name} container {c.get('name')}"
        f.check(bool(c.get("image")), f"{cw}: no image")
        res = c.get("resources", {})
        req, lim = res.get("requests", {}), res.get("limits", {})
        f.check("cpu" in req and "memory" in req, f"{cw}: resources.requests needs cpu and memory")
        f.check("memory" in lim, f"{cw}: resources.limits needs memory")
        if "nvidia.com/gpu" in lim or "nvidia.com/gpu" in req:
            g = lim.get("nvidia.com/gpu")
            f.check(isinstance(g, int) and g >= 1,
                    f"{cw}: nvidia.com/gpu must be a whole-number limit, got {g!r}")
            f.check(req.get("nvidia.com/gpu", g) == g,
                    f"{cw}: nvidia.com/gpu request {req.get('nvidia.com/gpu')} != limit {g}")
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            p = c.get(probe)
            if not f.check(p is not None, f"{cw}: no {probe}"):
                continue
            handlers = [h for h in HANDLERS if h in p]
            f.check(len(handlers) == 1, f"{cw}: {probe} needs exactly one handler, has {handlers}")
            for h in handlers:
                port = p[h].get("port") if isinstance(p[h], dict) else None
                if h == "grpc":
                    f.check(isinstance(port, int) and port in ports.values(),
                            f"{cw}: {probe}.grpc.port {port!r} is not a numbered container port")
                elif h in ("httpGet", "tcpSocket"):
                    f.check(port in ports or port in ports.values(),
                            f"{cw}: {probe}.{h}.port {port!r} is not a container port")
        sc = c.get("securityContext", {})
        f.check(sc.get("allowPrivilegeEscalation") is False,
                f"{cw}: securityContext.allowPrivilegeEscalation is not false")
        for vm in c.get("volumeMounts", []):
            f.check(vm["name"] in volumes, f"{cw}: volumeMount {vm['name']} has no volume")
    for vname, v in volumes.items():
        ref = None
        if "configMap" in v:
            ref = ("ConfigMap", v["configMap"]["name"])
        elif "secret" in v:
            ref = ("Secret", v["secret"]["secretName"])
        elif "persistentVolumeClaim" in v:
            ref = ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
        if ref and where.startswith("overlays/"):
            exists = ref[1] in by_kind.get(ref[0], {}) or ref in EXTERNAL
            f.check(exists, f"{where}: Deployment {name} volume {vname}: {ref[0]} {ref[1]} "
                            "is not in the render")


def check_render(f, where, docs, overlay):
    by_kind = {}
    for d in docs:
        ok = f.check(all(k in d for k in ("apiVersion", "kind", "metadata"))
                     and d["metadata"].get("name"),
                     f"{where}: an object lacks apiVersion, kind or metadata.name: {str(d)[:80]}")
        if not ok:
            continue
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
        if overlay and d["kind"] in NAMESPACED:
            f.check(bool(d["metadata"].get("namespace")),
                    f"{where}: {d['kind']} {d['metadata']['name']} has no namespace")
    deployments = by_kind.get("Deployment", {})
    for d in deployments.values():
        check_deployment(f, where, d, by_kind)

    # Services select the pods of a Deployment, on ports those pods have.
    for s in by_kind.get("Service", {}).values():
        sel = s.get("spec", {}).get("selector") or {}
        name = s["metadata"]["name"]
        f.check(bool(sel), f"{where}: Service {name} has no selector")
        targets = [d for d in deployments.values()
                   if matches(sel, d["spec"]["template"]["metadata"].get("labels", {}))]
        if deployments:
            f.check(bool(targets), f"{where}: Service {name} selector {sel} matches no Deployment")
        for d in targets:
            names = {p.get("name") for c in d["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
            nums = {p.get("containerPort") for c in d["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])}
            for p in s["spec"].get("ports", []):
                tp = p.get("targetPort", p.get("port"))
                f.check(tp in names or tp in nums,
                        f"{where}: Service {name} port {p.get('name')} targets {tp!r}, which "
                        f"Deployment {d['metadata']['name']} does not expose")

    # ServiceMonitors select a Service that has the endpoint's port.
    services = by_kind.get("Service", {})
    for sm in by_kind.get("ServiceMonitor", {}).values():
        name = sm["metadata"]["name"]
        sel = sm["spec"].get("selector", {}).get("matchLabels", {})
        hits = [s for s in services.values() if matches(sel, s["metadata"].get("labels", {}))]
        if services:
            f.check(bool(hits), f"{where}: ServiceMonitor {name} selects no Service ({sel})")
        for ep in sm["spec"].get("endpoints", []):
            for s in hits:
                f.check(ep.get("port") in {p.get("name") for p in s["spec"]["ports"]},
                        f"{where}: ServiceMonitor {name} port {ep.get('port')} not on Service "
                        f"{s['metadata']['name']}")
        jl = sm["spec"].get("jobLabel")
        for s in hits:
            if jl:
                f.check(jl in s["metadata"].get("labels", {}),
                        f"{where}: ServiceMonitor {name} jobLabel {jl} is not a label of "
                        f"Service {s['metadata']['name']}")

    # Autoscalers point at a Deployment of the render.
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for o in by_kind.get(kind, {}).values():
            ref = o["spec"]["scaleTargetRef"]["name"]
            if deployments:
                f.check(ref in deployments, f"{where}: {kind} {o['metadata']['name']} targets "
                                            f"Deployment {ref}, not in the render")
            mn = o["spec"].get("minReplicaCount", o["spec"].get("minReplicas"))
            f.check(isinstance(mn, int) and mn >= 1,
                    f"{where}: {kind} min replicas {mn!r}: must be >= 1 (generation needs a "
                    "connected worker to queue at all)")
            # An autoscaled Deployment must leave replicas to the autoscaler: `kubectl apply`
            # would reset the live count to the manifest's on every apply.
            target = deployments.get(ref)
            if target is not None:
                f.check("replicas" not in target.get("spec", {}),
                        f"{where}: Deployment {ref} is scaled by {kind} "
                        f"{o['metadata']['name']}: it must not set spec.replicas")
            # KEDA's Prometheus trigger reads what the Prometheus Operator scrapes, which only
            # ServiceMonitors / PodMonitors make it scrape.
            if kind == "ScaledObject":
                prometheus = [t for t in o["spec"].get("triggers", []) if t.get("type") == "prometheus"]
                if prometheus and deployments:  # a whole deployment, not the component alone
                    f.check(bool(by_kind.get("ServiceMonitor")) or bool(by_kind.get("PodMonitor")),
                            f"{where}: ScaledObject {o['metadata']['name']} queries Prometheus, but "
                            "the render has no ServiceMonitor: nothing would be scraped (add "
                            "../../monitoring)")

    for pvc in by_kind.get("PersistentVolumeClaim", {}).values():
        f.check(bool(pvc["spec"].get("accessModes"))
                and pvc["spec"].get("resources", {}).get("requests", {}).get("storage"),
                f"{where}: PVC {pvc['metadata']['name']} needs accessModes and a storage request")

    # The server: over SQLite one replica, stopped before its successor starts; over PostgreSQL
    # (shared-store scheduling) 2+ replicas rolled one at a time with a disruption budget. Both:
    # a grace period longer than the drain. Workers: a grace period that covers a step +
    # ReturnLease.
    server = deployments.get("perfusion-server")
    cms = list(by_kind.get("ConfigMap", {}).values())
    if server:
        args = [a for c in server["spec"]["template"]["spec"]["containers"] for a in c.get("args", [])]
        on_postgres = any(a.startswith("--store=postgres") for a in args)
        if on_postgres:
            f.check(server["spec"].get("replicas", 1) >= 2,
                    f"{where}: perfusion-server on PostgreSQL should run 2+ replicas")
            strategy = server["spec"].get("strategy", {})
            f.check(strategy.get("type", "RollingUpdate") == "RollingUpdate"
                    and str(strategy.get("rollingUpdate", {}).get("maxUnavailable")) == "0",
                    f"{where}: perfusion-server on PostgreSQL: RollingUpdate with maxUnavailable 0")
            pdbs = [p for p in by_kind.get("PodDisruptionBudget", {}).values()
                    if p["spec"].get("selector", {}).get("matchLabels", {}).items()
                    <= server["spec"]["template"]["metadata"].get("labels", {}).items()]
            f.check(any(p["spec"].get("minAvailable", 0) >= 1 for p in pdbs),
                    f"{where}: perfusion-server replicas need a PodDisruptionBudget minAvailable >= 1")
        else:
            f.check(server["spec"].get("replicas", 1) == 1,
                    f"{where}: perfusion-server replicas must be 1 with the SQLite store")
            f.check(server["spec"].get("strategy", {}).get("type") == "Recreate",
                    f"{where}: perfusion-server strategy must be Recreate (ReadWriteOnce volume)")
        flags = flags_of(cms, "server.flags")
        if f.check(flags is not None, f"{where}: no ConfigMap with server.flags"):
            drain = int(flags.get("drain_seconds", "30"))
            grace = server["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            f.check(grace >= drain + 10, f"{where}: server grace {grace}s must exceed "
                                         f"--drain_seconds={drain} by 10 s")
            f.check(flags.get("metrics_listen", "").startswith("0.0.0.0:"),
                    f"{where}: server --metrics_listen must listen on 0.0.0.0 to be scraped")
    worker = deployments.get("perfusion-worker")
    if worker:
        grace = worker["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        f.check(grace >= 30, f"{where}: worker grace {grace}s is too short to hand leases back")
        flags = flags_of(cms, "worker.flags")
        if f.check(flags is not None, f"{where}: no ConfigMap with worker.flags"):
            ml = flags.get("metrics_listen", "")
            f.check(ml.startswith("0.0.0.0:"),
                    f"{where}: worker --metrics_listen {ml!r} must be 0.0.0.0 (probes, scrapes)")
            port = int(ml.rsplit(":", 1)[-1]) if ml else None
            cports = {p["containerPort"] for c in worker["spec"]["template"]["spec"]["containers"]
                      for p in c.get("ports", [])}
            f.check(port in cports, f"{where}: worker metrics port {port} is not a containerPort")
            server_addr = flags.get("server", "")
            if server:
                f.check(server_addr == "perfusion-server:50051",
                        f"{where}: worker --server={server_addr} is not the server Service")
            gpu = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                      for c in worker["spec"]["template"]["spec"]["containers"])
            f.check(gpu == (flags.get("device", "cpu").startswith("cuda")),
                    f"{where}: worker --device={flags.get('device')} and nvidia.com/gpu limit "
                    "disagree")
            # The autoscaling query counts queued generations per worker batch: its divisor is
            # the workers' --max_batch, or it asks for the wrong number of workers.
            max_batch = int(flags.get("max_batch", "4"))
            for o in by_kind.get("ScaledObject", {}).values():
                for t in o["spec"].get("triggers", []):
                    m = re.search(r"perfusion_generate_queue_depth[^/]*/\s*(\d+)",
                                  t.get("metadata", {}).get("query", ""))
                    if m:
                        f.check(int(m.group(1)) == max_batch,
                                f"{where}: ScaledObject {o['metadata']['name']} divides queued "
                                f"generations by {m.group(1)}, but workers run --max_batch="
                                f"{max_batch}")
    return by_kind


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubectl", default=dl.tool("kubectl", "KUBECTL"))
    ap.add_argument("--yamllint", default=dl.tool("yamllint", "YAMLLINT"))
    args = ap.parse_args()
    dl.need_yaml()
    f = dl.Failures("deploy_manifests")
    if not args.kubectl or not args.yamllint:
        f.fail("kubectl and yamllint are needed (scripts/install-deps.sh installs "
               "kubernetes-client and yamllint)")
        return f.finish()
    code, out, err = dl.run([args.kubectl, "version", "--client"], timeout=30)
    print(f"kubectl: {(out or err).strip().splitlines()[0] if (out or err).strip() else '?'}")

    # 1. yamllint over every YAML file under deploy/ (config: deploy/.yamllint).
    code, out, err = dl.run([args.yamllint, "--strict", "-c",
                             os.path.join(dl.DEPLOY, ".yamllint"), dl.DEPLOY], timeout=120)
    f.check(code == 0, f"yamllint deploy/ failed:\n{out}{err}")

    # 2. Render every kustomization; lint and check the rendered objects.
    renders = {}
    for path in dl.kustomization_dirs():
        where = os.path.relpath(path, dl.DEPLOY)
        docs, error = dl.render(args.kubectl, path)
        if not f.check(docs is not None, f"{where}: kubectl kustomize failed: {error}"):
            continue
        f.check(bool(docs), f"{where}: renders no objects")
        renders[where] = docs
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
            tmp.write(dl.yaml.safe_dump_all(docs))
        code, out, err = dl.run([args.yamllint, "-d",
                                 "{extends: relaxed, rules: {line-length: disable}}", tmp.name])
        os.unlink(tmp.name)
        f.check(code == 0, f"{where}: the rendered YAML fails yamllint:\n{out}{err}")
        check_render(f, where, docs, overlay=where.startswith("overlays/"))
        print(f"rendered {where}: {len(docs)} objects")

    # 3. Each overlay is a complete deployment: server, worker, their config, the namespace.
    overlays = [w for w in renders if w.startswith("overlays/")]
    f.check(len(overlays) >= 2, f"expected the cpu-demo and gpu overlays, found {overlays}")
    for where in overlays:
        kinds = {(d["kind"], d["metadata"]["name"]) for d in renders[where]}
        for need in (("Deployment", "perfusion-server"), ("Deployment", "perfusion-worker"),
                     ("Service", "perfusion-server")):
            f.check(need in kinds, f"{where}: no {need[0]} {need[1]}")
        f.check(any(k == "Namespace" for k, _ in kinds), f"{where}: no Namespace object")
    gpu = renders.get("overlays/gpu", [])
    gpu_workers = [d for d in gpu if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == "perfusion-worker"]
    f.check(bool(gpu_workers) and all(
        "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
        for d in gpu_workers for c in d["spec"]["template"]["spec"]["containers"]),
        "overlays/gpu: the worker has no nvidia.com/gpu limit")
    demo = renders.get("overlays/cpu-demo", [])
    f.check(any(d["kind"] == "Secret" and d["metadata"]["name"].startswith("perfusion-tokens")
                for d in demo), "overlays/cpu-demo: no generated perfusion-tokens Secret")

    # 4. The HPA alternative combined with the base, as docs/deploy.md tells users to do.
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "kustomization.yaml"), "w") as k:
            k.write("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                    "namespace: perfusion\nbases:\n"
                    f"  - {os.path.relpath(os.path.join(dl.DEPLOY, 'base'), tmp)}\n"
                    f"  - {os.path.relpath(os.path.join(dl.DEPLOY, 'autoscaling', 'hpa'), tmp)}\n"
                    "secretGenerator:\n  - name: perfusion-tokens\n    literals:\n"
                    "      - tokens.txt=t tenant\n      - worker_tokens.txt=w\n")
        docs, error = dl.render(args.kubectl, tmp)
        if f.check(docs is not None, f"base + autoscaling/hpa: kubectl kustomize failed: {error}"):
            check_render(f, "overlays(base+hpa)", docs, overlay=True)
    return f.finish()


if __name__ == "__main__":
    sys.exit(main())
