#!/usr/bin/env python3
"""Validates rendered overlays (target/k8s/<region>.yaml) offline.

1. Every built-in object strictly against the Kubernetes OpenAPI schemas of
   one pinned version (kubernetes-validate, --strict: unknown fields fail);
   an object of a kind with no schema fails too, unless it is one of the CRD
   kinds checked elsewhere (ServiceMonitor, PrometheusRule: crdcheck, the
   operator's Go types) or here (ScaledObject: schemas/, KEDA's documented
   fields).
2. What only this project knows: the objects fit together (selectors, ports,
   names), the config holds no secret, sizes and counts fit the measured
   figures, each overlay is its region.
3. Self-test: a copy with an unknown field in a Deployment and in a
   ScaledObject must fail, or the strictness above is not real.

    validate.py --k8s-version 1.33.0 target/k8s/us-east-1.yaml ...
"""

import argparse
import copy
import json
import os
import re
import sys
import tomllib

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKED_BY_CRDCHECK = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
SCALEDOBJECT = ("keda.sh/v1alpha1", "ScaledObject")

# Figures the manifests are sized from (README.md, "Tests": make bench).
PEAK_RSS_BYTES = 155 * 10**6  # worst replay peak; 126-135 MB since freed pages go back at once
# The worker gives in-flight batches at most 8 s after SIGTERM (src/source.rs),
# then leaves the group; tests/crash.rs asserts an exit within 10 s.
DRAIN_BOUND_S = 10
# Partitions per mirrored topic in the examples (deploy/local/env.sh's
# TOPIC_PARTITIONS): replicas beyond it would sit idle.
PARTITIONS = 4
SECRET_WORDS = re.compile(r"pass(word)?|secret|token|credential|private|\.key\b|sasl\.oauthbearer", re.I)


def memory_bytes(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([KMG]i?)?", str(q))
    if not m:
        raise ValueError(f"memory quantity {q!r}")
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def schema_problems(objs, version, scaledobject_schema):
    problems = []
    for o in objs:
        key = (o.get("apiVersion"), o.get("kind"))
        name = f"{o.get('kind')}/{o.get('metadata', {}).get('name')}"
        if key in CHECKED_BY_CRDCHECK:
            continue
        if key == SCALEDOBJECT:
            v = jsonschema.Draft202012Validator(scaledobject_schema)
            for e in sorted(v.iter_errors(o), key=lambda e: list(e.path)):
                problems.append(f"{name}: {'/'.join(map(str, e.path))}: {e.message}")
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name}: {'/'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{name}: no schema for {key} in Kubernetes {version}: {e}")
    return problems


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def project_problems(region, objs):
    p = []
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    for kind in ["Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                 "ServiceMonitor", "PrometheusRule", "NetworkPolicy"]:
        if len(by_kind.get(kind, [])) != 1:
            p.append(f"expected one {kind}, found {len(by_kind.get(kind, []))}")
    if p:
        return p
    if "Secret" in by_kind:
        p.append("a Secret is rendered: Secrets are created apart (deploy/k8s/README.md), never committed")
    ns = by_kind["Namespace"][0]
    if ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") != "restricted":
        p.append("Namespace: pod security 'restricted' is not enforced")
    for o in objs:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != ns["metadata"]["name"]:
            p.append(f"{o['kind']}/{o['metadata']['name']}: not in namespace {ns['metadata']['name']}")
        if o["metadata"].get("labels", {}).get("region") != region:
            p.append(f"{o['kind']}/{o['metadata']['name']}: label region is not {region}")

    dep = by_kind["Deployment"][0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    (c,) = spec["containers"]
    if not matches(dep["spec"]["selector"]["matchLabels"], pod_labels):
        p.append("Deployment: selector does not match its pods")
    if pod_labels.get("region") != region:
        p.append("Deployment: pods lack region label")

    # Config: the generated ConfigMap the pod mounts, a valid region config.
    cm = by_kind["ConfigMap"][0]
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    cfg_mount = mounts.get("/etc/regionsync")
    if not cfg_mount or vols[cfg_mount["name"]].get("configMap", {}).get("name") != cm["metadata"]["name"]:
        p.append("Deployment: /etc/regionsync is not the rendered ConfigMap")
    if c.get("args", [])[:2] != ["--config", "/etc/regionsync/regionsync.toml"]:
        p.append("Deployment: the worker is not pointed at /etc/regionsync/regionsync.toml")
    toml_text = cm["data"]["regionsync.toml"]
    cfg = tomllib.loads(toml_text)
    if cfg.get("region") != region:
        p.append(f"config: region is {cfg.get('region')!r}, not {region}")
    if cfg.get("consumer_group", f"regionsync-{region}") != f"regionsync-{region}":
        p.append("config: consumer_group is not regionsync-<region>")
    pg = cfg.get("postgres", {})
    if "password" in pg:
        p.append("config: postgres.password is in the ConfigMap; use password_file (a Secret)")
    pw = pg.get("password_file", "")
    pw_mount = next((m for path, m in mounts.items() if pw.startswith(path + "/")), None)
    if not pw_mount or "secret" not in vols[pw_mount["name"]]:
        p.append(f"config: postgres.password_file {pw!r} is not on a Secret volume")
    for k in cfg.get("kafka", {}).get("properties", {}):
        if SECRET_WORDS.search(k) and not k.endswith(".location"):
            p.append(f"config: kafka.properties.{k} looks like a secret; set it from a Secret")
    url = cfg.get("schema_registry", {}).get("url") or ""
    if re.match(r"^[a-z]+://[^/]*@", url):
        p.append("config: schema_registry.url carries credentials; set it from a Secret")
    for line in toml_text.splitlines():
        if re.match(r"^\s*[^#\s].*=", line) and SECRET_WORDS.search(line.split("=", 1)[0]) and "password_file" not in line:
            p.append(f"config: {line.strip()!r} looks like a secret")

    # Metrics port: config, container port, probes, Service, ServiceMonitor.
    listen_port = int(cfg.get("metrics", {}).get("listen", "127.0.0.1:9464").rsplit(":", 1)[1])
    if not cfg.get("metrics", {}).get("listen", "").startswith("0.0.0.0:"):
        p.append("config: metrics.listen must bind 0.0.0.0 in a pod")
    ports = {pt["name"]: pt["containerPort"] for pt in c.get("ports", [])}
    if ports.get("metrics") != listen_port:
        p.append(f"Deployment: port 'metrics' is {ports.get('metrics')}, metrics.listen says {listen_port}")
    for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        g = c.get(probe, {}).get("httpGet", {})
        if g.get("path") != path or g.get("port") not in ("metrics", listen_port):
            p.append(f"Deployment: {probe} is not {path} on the metrics port")
    svc = by_kind["Service"][0]
    if not matches(svc["spec"]["selector"], pod_labels):
        p.append("Service: selector does not match the pods")
    if not any(pt.get("targetPort") in ("metrics", listen_port) and pt.get("name") == "metrics" for pt in svc["spec"]["ports"]):
        p.append("Service: no port 'metrics' to the metrics port")
    sm = by_kind["ServiceMonitor"][0]
    if not matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]):
        p.append("ServiceMonitor: selector does not match the Service")
    if [e.get("port") for e in sm["spec"]["endpoints"]] != ["metrics"]:
        p.append("ServiceMonitor: endpoint is not the Service's metrics port")
    if svc["metadata"]["labels"].get(sm["spec"].get("jobLabel")) != "regionsync":
        p.append("ServiceMonitor: job label would not be 'regionsync' (the rules' job)")
    if "region" not in sm["spec"].get("targetLabels", []) or svc["metadata"]["labels"].get("region") != region:
        p.append("ServiceMonitor: series would lack region=<region> (targetLabels)")

    pdb = by_kind["PodDisruptionBudget"][0]
    if not matches(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        p.append("PodDisruptionBudget: selector does not match the pods")
    netpol = by_kind["NetworkPolicy"][0]
    if not matches(netpol["spec"]["podSelector"]["matchLabels"], pod_labels):
        p.append("NetworkPolicy: podSelector does not match the pods")
    ingress_ports = [pt.get("port") for r in netpol["spec"].get("ingress", []) for pt in r.get("ports", [])]
    if set(ingress_ports) - {"metrics", listen_port}:
        p.append(f"NetworkPolicy: ingress beyond the metrics port: {ingress_ports}")
    egress_ports = {pt.get("port") for r in netpol["spec"].get("egress", []) for pt in r.get("ports", [])}
    kafka_ports = {int(a.rsplit(":", 1)[1]) for a in cfg["kafka"]["bootstrap_servers"].split(",")}
    needed = {53, pg.get("port", 5432)} | kafka_ports
    if url:
        needed.add(int(re.match(r"^[a-z]+://[^/:]+(?::(\d+))?", url).group(1) or (443 if url.startswith("https") else 80)))
    if needed - egress_ports:
        p.append(f"NetworkPolicy: egress lacks ports {sorted(needed - egress_ports)} the config uses")

    # Sizes and counts from the measured figures.
    lim = c["resources"]["limits"]
    req = c["resources"]["requests"]
    if memory_bytes(req["memory"]) < PEAK_RSS_BYTES:
        p.append(f"Deployment: memory request {req['memory']} is below the measured peak RSS")
    if memory_bytes(lim["memory"]) < 1.5 * PEAK_RSS_BYTES:
        p.append(f"Deployment: memory limit {lim['memory']} leaves under 50% over the measured peak RSS")
    if spec.get("terminationGracePeriodSeconds", 30) <= DRAIN_BOUND_S:
        p.append("Deployment: terminationGracePeriodSeconds is not longer than the SIGTERM drain")
    if dep["spec"].get("replicas", 1) > PARTITIONS:
        p.append(f"Deployment: more replicas than partitions ({PARTITIONS})")
    for so in by_kind.get("ScaledObject", []):
        if so["spec"].get("maxReplicaCount", 100) > PARTITIONS:
            p.append(f"ScaledObject: maxReplicaCount above the partitions ({PARTITIONS})")
        if so["spec"]["scaleTargetRef"]["name"] != dep["metadata"]["name"]:
            p.append("ScaledObject: does not target the Deployment")
        for t in so["spec"]["triggers"]:
            md = t["metadata"]
            if t["type"] == "kafka":
                if md.get("consumerGroup") != cfg.get("consumer_group", f"regionsync-{region}"):
                    p.append("ScaledObject: consumerGroup is not the worker's")
                if md.get("bootstrapServers") != cfg["kafka"]["bootstrap_servers"]:
                    p.append("ScaledObject: bootstrapServers is not the worker's Kafka")

    # The pod as Pod Security "restricted" and the issue ask.
    sc = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
    if spec.get("automountServiceAccountToken") is not False:
        p.append("Deployment: service account token is mounted")
    if not (sc.get("runAsNonRoot") and sc.get("runAsUser", 0) > 0 and c["securityContext"].get("readOnlyRootFilesystem")
            and c["securityContext"].get("allowPrivilegeEscalation") is False
            and c["securityContext"].get("capabilities", {}).get("drop") == ["ALL"]
            and sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"):
        p.append("Deployment: pod is not restricted (non-root, read-only root, no escalation, drop ALL, seccomp)")
    if not any(t["topologyKey"] == "topology.kubernetes.io/zone" for t in spec.get("topologySpreadConstraints", [])):
        p.append("Deployment: not spread across zones")
    return p


def self_test(objs, version, schema):
    """Strict validation must reject an unknown field; returns problems."""
    p = []
    for kind, where in [("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0]),
                        ("ScaledObject", lambda o: o["spec"])]:
        target = next((o for o in objs if o["kind"] == kind), None)
        if target is None:
            continue
        bad = copy.deepcopy(target)
        where(bad)["notAField"] = True
        if not schema_problems([bad], version, schema):
            p.append(f"self-test: an unknown field in a {kind} was not rejected")
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k8s-version", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    with open(os.path.join(HERE, "schemas", "scaledobject-keda-v1alpha1.json")) as f:
        so_schema = json.load(f)
    failed = False
    region_lists = {}
    for path in args.files:
        region = os.path.basename(path).removesuffix(".yaml")
        objs = load(path)
        for o in objs:
            if o["kind"] == "ConfigMap" and "regionsync.toml" in o.get("data", {}):
                region_lists[region] = tomllib.loads(o["data"]["regionsync.toml"]).get("regions")
        problems = schema_problems(objs, args.k8s_version, so_schema)
        kinds = sorted({o["kind"] for o in objs})
        problems += project_problems(region, objs)
        problems += self_test(objs, args.k8s_version, so_schema)
        if problems:
            failed = True
            for x in problems:
                print(f"FAIL {path}: {x}")
        else:
            print(f"ok   {path}: {len(objs)} objects ({', '.join(kinds)}) valid for Kubernetes "
                  f"{args.k8s_version} (strict), consistent, unknown fields rejected")
    # Routing needs one region list, in one order, in every region.
    lists = {tuple(v or ()) for v in region_lists.values()}
    if len(lists) > 1:
        failed = True
        print(f"FAIL the overlays' regions lists differ: {region_lists}")
    elif lists and not set(region_lists) <= set(next(iter(lists))):
        failed = True
        print(f"FAIL an overlay's region is missing from regions: {sorted(region_lists)} vs {next(iter(lists))}")
    elif lists:
        print(f"ok   every overlay has regions = {list(next(iter(lists)))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
