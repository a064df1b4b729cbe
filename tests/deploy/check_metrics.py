#!/usr/bin/env python3
"""deploy_metrics_exported: every metric that deploy/ names (Grafana dashboard, alert rules,
autoscaling queries) is exported by the real binaries, with the labels the queries use.

Starts perfusion-server (and perfusion-worker on the tiny model when both are there) on
loopback ports with a temporary data folder and tokens files, reading the flag files of
deploy/base (so they are proven to parse), does a short round trip with perfusionctl (health,
a training job, two generations when a worker runs, a cancelled job and a refused call
otherwise), scrapes both /metrics pages and compares.

  check_metrics.py --server BIN [--worker BIN] [--ctl BIN] [--model DIR] [--tokenizer DIR]

The tiny model is --model, else $PERFUSION_TINY_MODEL, else models/tiny; without it (or without
the worker binary) the worker's metrics are reported as not verified and the rest is checked.
Every process is started in its own process group and killed on the way out; every wait is
bounded.
"""
import argparse
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402

TENANT_TOKEN = "deploy-check-token"
WORKER_TOKEN = "deploy-check-worker-token"
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv, log_path):
    log = open(log_path, "w")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True)
    PROCS.append((p, log))
    return p


def stop_all():
    """SIGTERM each process group (the graceful path), then SIGKILL what is left."""
    for p, _ in reversed(PROCS):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 20
    for p, log in reversed(PROCS):
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
        log.close()


def wait_log(proc, path, needle, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(path) as f:
            text = f.read()
        if needle in text:
            return text
        if proc.poll() is not None:
            return None
        time.sleep(0.1)
    return None


def log_int(text, event, key):
    for line in text.splitlines():
        if f"event={event}" in line:
            m = re.search(rf"\b{key}=(\d+)", line)
            if m:
                return int(m.group(1))
    return None


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def png(path, w, h, rgb):
    """A solid-colour RGB PNG with a darker square, written without third-party modules."""
    rows = []
    for y in range(h):
        row = bytearray([0])
        for x in range(w):
            inside = w // 4 <= x < 3 * w // 4 and h // 4 <= y < 3 * h // 4
            row += bytes(c // 3 if inside else c for c in rgb)
        rows.append(bytes(row))

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(b"".join(rows))))
        f.write(chunk(b"IEND", b""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--worker")
    ap.add_argument("--ctl")
    ap.add_argument("--model")
    ap.add_argument("--tokenizer")
    args = ap.parse_args()
    for k in ("server", "worker", "ctl", "model", "tokenizer"):
        if getattr(args, k):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    dl.need_yaml()
    f = dl.Failures("deploy_metrics_exported")
    notes = []

    model = args.model or os.environ.get("PERFUSION_TINY_MODEL") or os.path.join(
        dl.REPO, "models", "tiny")
    have_model = os.path.exists(os.path.join(model, "unet", "config.json"))
    worker_ok = bool(args.worker and os.path.exists(args.worker) and have_model)
    if not worker_ok:
        why = "no perfusion-worker binary" if not (args.worker and os.path.exists(args.worker)) \
            else f"no tiny model at {model} (set PERFUSION_TINY_MODEL)"
        notes.append(f"SKIPPED the worker part: {why}; perfusion_worker_* metrics not verified")
    ctl = args.ctl if args.ctl and os.path.exists(args.ctl) else None
    if not f.check(os.path.exists(args.server), f"no server binary at {args.server}"):
        return f.finish()

    tmp = tempfile.mkdtemp(prefix="perfusion-deploy-")
    try:
        return run_checks(f, args, tmp, model, worker_ok, ctl, notes)
    finally:
        stop_all()
        if os.environ.get("PERFUSION_KEEP_TEST_DIRS") is None:
            subprocess.run(["rm", "-rf", tmp], check=False)
        else:
            print(f"kept {tmp}")


def run_checks(f, args, tmp, model, worker_ok, ctl, notes):
    with open(os.path.join(tmp, "tokens.txt"), "w") as t:
        t.write(f"# deploy check\n{TENANT_TOKEN} deploycheck\n")
    with open(os.path.join(tmp, "worker_tokens.txt"), "w") as t:
        t.write(f"{WORKER_TOKEN}\n")
    tokenizer = args.tokenizer if args.tokenizer and os.path.exists(
        os.path.join(args.tokenizer, "vocab.json")) else None

    base_model_id = "perfusion-tiny-v3"
    if worker_ok:
        id_file = os.path.join(model, "perfusion", "model_id")
        if os.path.exists(id_file):
            base_model_id = open(id_file).read().strip() or base_model_id
        else:
            argv = [args.worker, "--print_base_model_id", f"--model_dir={model}"]
            if tokenizer:
                argv.append(f"--tokenizer_dir={tokenizer}")
            code, out, err = dl.run(argv, timeout=180)
            if not f.check(code == 0, f"perfusion-worker --print_base_model_id failed: {err}"):
                return f.finish()
            base_model_id = out.strip()
        # The GPU overlay's flag file parses too (the device is overridden to the CPU here).
        gpu_flags = os.path.join(dl.DEPLOY, "overlays", "gpu", "worker.flags")
        if os.path.exists(gpu_flags):
            argv = [args.worker, f"--flagfile={gpu_flags}", "--device=cpu", "--dtype=fp32",
                    "--print_base_model_id", f"--model_dir={model}"]
            if tokenizer:
                argv.append(f"--tokenizer_dir={tokenizer}")
            code, out, err = dl.run(argv, timeout=180)
            f.check(code == 0 and out.strip() == base_model_id,
                    f"perfusion-worker does not accept deploy/overlays/gpu/worker.flags: {err}")

    # The server, with deploy/base/server.flags first and loopback overrides after it.
    grpc_port = free_port()
    server_log = os.path.join(tmp, "server.log")
    server = start([args.server, f"--flagfile={os.path.join(dl.DEPLOY, 'base', 'server.flags')}",
                    f"--listen=127.0.0.1:{grpc_port}", "--metrics_listen=127.0.0.1:0",
                    f"--data_dir={tmp}/data", f"--tokens_file={tmp}/tokens.txt",
                    f"--worker_tokens_file={tmp}/worker_tokens.txt",
                    f"--base_model_id={base_model_id}", "--max_lease_wait_seconds=2",
                    "--default_image_side=32", "--default_train_steps=2", "--drain_seconds=2"],
                   server_log)
    text = wait_log(server, server_log, "event=server_started", 60)
    if not f.check(text is not None, "perfusion-server did not start:\n" + open(server_log).read()
                   [-3000:]):
        return f.finish()
    server_metrics = log_int(text, "server_started", "metrics_port")
    address = f"127.0.0.1:{grpc_port}"

    worker_metrics = None
    if worker_ok:
        worker_log = os.path.join(tmp, "worker.log")
        argv = [args.worker, f"--flagfile={os.path.join(dl.DEPLOY, 'base', 'worker.flags')}",
                f"--server={address}", f"--worker_token_file={tmp}/worker_tokens.txt",
                f"--model_dir={model}", "--metrics_listen=127.0.0.1:0", "--threads=1",
                "--lease_wait_seconds=2", "--progress_interval_ms=200", "--name=deploy-check"]
        if tokenizer:
            argv.append(f"--tokenizer_dir={tokenizer}")
        worker = start(argv, worker_log)
        text = wait_log(worker, worker_log, "event=registered", 240)
        if f.check(text is not None, "perfusion-worker did not register:\n"
                   + open(worker_log).read()[-3000:]):
            worker_metrics = log_int(text, "metrics_listening", "metrics_port")

    # The round trip.
    if ctl:
        def ctl_run(*a, timeout=60, token=TENANT_TOKEN):
            return dl.run([ctl, f"--server={address}", f"--token={token}", "--quiet", *a],
                          timeout=timeout, cwd=tmp)

        code, out, err = ctl_run("health", "--service=")
        f.check(code == 0, f"perfusionctl health failed: {out}{err}")
        images = os.path.join(tmp, "images")
        os.makedirs(images)
        for i, rgb in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
            png(os.path.join(images, f"img{i}.png"), 64, 64, rgb)
        if worker_metrics is not None:
            code, out, err = ctl_run("train", images, "--superclass", "star", "--name",
                                     "deploycheck", "--steps", "2", "--timeout", "240s",
                                     timeout=300)
            f.check(code == 0, f"perfusionctl train failed: {out}{err}")
            for n in range(2):  # the first fetches the concept blob (miss), the second hits
                code, out, err = ctl_run("generate", "a photo of <deploycheck>", "-o",
                                         os.path.join(tmp, f"out{n}"), "--steps", "2",
                                         "--width", "32", "--height", "32", "--seed", str(n),
                                         "--timeout", "180s", timeout=240)
                f.check(code == 0, f"perfusionctl generate failed: {out}{err}")
        else:
            code, out, err = ctl_run("train", images, "--superclass", "star", "--name",
                                     "deploycheck", "--steps", "2", "--no-wait")
            if f.check(code == 0, f"perfusionctl train --no-wait failed: {out}{err}"):
                job = out.strip().splitlines()[0] if out.strip() else ""
                code, out, err = ctl_run("jobs", "cancel", job)
                f.check(code == 0, f"perfusionctl jobs cancel {job} failed: {out}{err}")
        ctl_run("concepts", "list")
        ctl_run("concepts", "list", token="not-a-token")  # an UNAUTHENTICATED call
    else:
        notes.append("perfusionctl not built: the round trip is only the scrapes")

    # Scrape and compare.
    fams = dl.parse_exposition(scrape(server_metrics))
    sources = {"server": fams}
    if worker_metrics is not None:
        wf = dl.parse_exposition(scrape(worker_metrics))
        sources["worker"] = wf
        for k, v in wf.items():
            fams.setdefault(k, v)
    referenced = {}
    grouping = {}
    for where, expr in collect_exprs():
        metrics, groups = dl.promql_references(expr)
        for name, labels in metrics.items():
            referenced.setdefault(name, {"labels": {}, "where": set()})
            for label in labels:
                referenced[name]["labels"].setdefault(label, set()).add(where)
            referenced[name]["where"].add(where)
        grouping[where + ": " + expr] = (set(metrics), groups)
    unverified = []
    for name in sorted(referenced):
        if name in dl.PROMETHEUS_MADE:
            continue
        fam = dl.resolve_metric(name, fams)
        if fam is None and name.startswith("perfusion_worker_") and "worker" not in sources:
            unverified.append(name)
            continue
        places = ", ".join(sorted(referenced[name]["where"]))[:300]
        if not f.check(fam is not None, f"{name} is not exported (used by {places})"):
            continue
        series = fams[fam]["series"]
        have = set().union(*series) if series else set()
        for label in sorted(set(referenced[name]["labels"]) - dl.TARGET_LABELS):
            users = ", ".join(sorted(referenced[name]["labels"][label]))[:300]
            if series:
                f.check(label in have, f"{name}: label {label!r} (used by {users}) is not on "
                                       f"any exported series (labels: {sorted(have)})")
    for key, (names, groups) in grouping.items():
        label_sets = set()
        for n in names:
            fam = dl.resolve_metric(n, fams)
            if fam and fams[fam]["series"]:
                label_sets |= set().union(*fams[fam]["series"])
        if not label_sets:
            continue
        for g in sorted(groups - dl.TARGET_LABELS - {"le"}):
            f.check(g in label_sets, f"grouping label {g!r} is on none of the metrics of {key}")
    checked = len([n for n in referenced if n not in dl.PROMETHEUS_MADE]) - len(unverified)
    print(f"server metrics port {server_metrics}, worker metrics port {worker_metrics}: "
          f"{checked} referenced metrics checked against {len(fams)} exported families")
    empty = sorted(n for n in referenced if dl.resolve_metric(n, fams)
                   and not fams[dl.resolve_metric(n, fams)]["series"])
    if empty:
        print("exported, no samples after the round trip: " + ", ".join(empty))
    if unverified:
        notes.append("not verified (no worker): " + ", ".join(unverified))
    for n in notes:
        print(n)
    return f.finish()


def collect_exprs():
    """deploy/'s PromQL from the files, plus the queries of ScaledObjects as overlays patch
    them (when kubectl is there to render the overlays)."""
    exprs = dl.all_deploy_exprs()
    kubectl = dl.tool("kubectl", "KUBECTL")
    if kubectl:
        for path in dl.kustomization_dirs():
            docs, _err = dl.render(kubectl, path)
            for d in docs or []:
                if d.get("kind") == "ScaledObject":
                    for t in d["spec"].get("triggers", []):
                        if t.get("type") == "prometheus":
                            exprs.append((f"ScaledObject in {os.path.relpath(path, dl.DEPLOY)}",
                                          t["metadata"]["query"]))
    return exprs


if __name__ == "__main__":
    sys.exit(main())
