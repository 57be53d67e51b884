"""Print, as shell assignments, what a rendered region's manifest says about
how the worker runs: its uid/gid, read-only root, args, where the config and
the password are mounted, the grace period, the metrics port and the config.

image_check.sh and runtime_check.sh both run the worker the way this says,
so they read it from one place.

usage: manifest_env.py RENDERED.yaml   (then: eval "$(...)")
"""
import shlex
import sys

import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
dep = next(d for d in docs if d["kind"] == "Deployment")
cm = next(d for d in docs if d["kind"] == "ConfigMap")
pod = dep["spec"]["template"]["spec"]
(c,) = pod["containers"]
sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
vols = {v["name"]: v for v in pod["volumes"]}
mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
cfg_vol = next(n for n, v in vols.items() if "configMap" in v)
pw_vol = next(n for n, v in vols.items() if v.get("secret", {}).get("secretName") == "regionsync-postgres")
out = {
    "M_UID": sc["runAsUser"],
    "M_GID": sc["runAsGroup"],
    "M_RO": str(c["securityContext"]["readOnlyRootFilesystem"]).lower(),
    "M_ARGS": " ".join(shlex.quote(a) for a in c["args"]),
    "M_CONFIG_DIR": mounts[cfg_vol],
    "M_PW_DIR": mounts[pw_vol],
    "M_PW_FILE": vols[pw_vol]["secret"]["items"][0]["path"],
    "M_GRACE": pod["terminationGracePeriodSeconds"],
    "M_PORT": next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics"),
    "M_TOML": cm["data"]["regionsync.toml"],
}
for k, v in out.items():
    print(f"{k}={shlex.quote(str(v))}")
