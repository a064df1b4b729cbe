#!/usr/bin/env python3
"""deploy_dockerfile: static checks of the Dockerfile (no Docker engine is needed or used).

- Packages come only from scripts/install-deps.sh, the script the README and CI run: every
  builder runs it with no arguments, each image stage starts from the stage that ran
  `install-deps.sh --runtime=KIND` for its own kind (server, worker, worker-cuda: only the CPU
  worker gets Debian's LibTorch), and no stage installs packages another way (the CUDA
  builder's NVIDIA packages are the one listed exception). The configure line is CI's (scripts/test.sh).
- hadolint-style rules: tagged base images, exec-form CMD/ENTRYPOINT/HEALTHCHECK, a non-root
  USER in every image, pipefail SHELL before RUN, COPY not ADD for local files, no `cd` or
  `sudo` in RUN, apt lists removed, --no-install-recommends.
- The images agree with deploy/: exposed ports, the user id (securityContext.runAsUser), a
  HEALTHCHECK in each image; .dockerignore keeps what the build copies; the shared context
  has the tokenizer files the Dockerfile copies.
- With the built binaries (--binary, repeatable): every shared library they load belongs to a
  package that `install-deps.sh --runtime=KIND` installs for the image that carries them (or
  its dependencies), and those lists hold no -dev package.
- dockerfilelint (npm) when it can be installed: no findings except two known false positives
  of that old linter.

  check_dockerfile.py [--binary BIN]... [--shared DIR] [--npm-dir DIR]
"""
import argparse
import fnmatch
import json
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deploylib as dl  # noqa: E402

DOCKERFILE = os.environ.get("PERFUSION_DOCKERFILE", os.path.join(dl.REPO, "Dockerfile"))
INSTALL_DEPS = os.path.join(dl.REPO, "scripts", "install-deps.sh")
TEST_SH = os.path.join(dl.REPO, "scripts", "test.sh")
IMAGE_STAGES = {"server", "worker", "worker-cuda"}
# Each image's runtime stage, the install-deps.sh list it installs, and the binaries it carries.
RUNTIME_LISTS = {"server": ["RUNTIME_SERVER_PKGS"],
                 "worker": ["RUNTIME_WORKER_CUDA_PKGS", "RUNTIME_WORKER_PKGS"],
                 "worker-cuda": ["RUNTIME_WORKER_CUDA_PKGS"]}
BINARY_IMAGE = {"perfusion-server": "server", "perfusionctl": "server", "perfusion-worker": "worker"}
# The only packages installed outside install-deps.sh: NVIDIA's CUDA toolkit (Debian 12 has no
# CUDA 12) and unzip for the LibTorch archive, in the CUDA builder.
EXTRA_PACKAGES = {"builder-cuda": [r"cuda-toolkit-\$\{CUDA_VERSION\}", r"unzip"]}
DOCKERFILELINT_VERSION = "1.8.0"


def parse(path):
    """[(line number, instruction, arguments)] with continuations joined, comments dropped."""
    out = []
    buf, start = "", 0
    with open(path) as f:
        lines = f.read().split("\n")
    for i, raw in enumerate(lines, 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if not buf:
            start = i
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out


def stages(instrs):
    """{stage name: {"from": image, "line": n, "instrs": [...]}} in order, plus global ARGs."""
    result, order, args = {}, [], {}
    current = None
    for ln, ins, rest in instrs:
        if ins == "FROM":
            m = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            current = m.group(2) or f"stage{len(order)}"
            result[current] = {"from": m.group(1), "line": ln, "instrs": []}
            order.append(current)
        elif current is None and ins == "ARG":
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip().strip('"')
        elif current:
            result[current]["instrs"].append((ln, ins, rest))
    return result, order, args


def bash_array(text, name):
    """The words of a bash array assignment, on one line or several (comments dropped)."""
    m = (re.search(rf"^{name}=\(([^\n]*?)\)[ \t]*(#[^\n]*)?$", text, re.M)
         or re.search(rf"^{name}=\((.*?)^\)", text, re.S | re.M))
    if not m:
        return []
    body = "\n".join(l.split("#", 1)[0] for l in m.group(1).splitlines())
    return body.split()


def check_static(f):
    instrs = parse(DOCKERFILE)
    st, order, gargs = stages(instrs)
    f.check(IMAGE_STAGES <= set(st), f"Dockerfile: stages {sorted(IMAGE_STAGES)} needed, have "
                                     f"{order}")
    f.check(order and order[-1] == "worker",
            "Dockerfile: the last (default) stage should be the CPU worker")

    def ancestry(name):
        chain = []
        while name in st:
            chain.append(name)
            name = st[name]["from"]
        return chain

    with open(TEST_SH) as t:
        ci_cmake = next((l.strip() for l in t if l.strip().startswith("cmake -S")), "")
    ci_tokens = shlex.split(ci_cmake.replace('"$BUILD_DIR"', "build"))
    for name in order:
        s = st[name]
        image = s["from"]
        where = f"Dockerfile:{s['line']} stage {name}"
        # Base images: a stage, or an image with an explicit tag that is not latest.
        if image not in st:
            resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: gargs.get(m.group(1), ""), image)
            tag = resolved.rsplit(":", 1)[1] if ":" in resolved.split("/")[-1] else ""
            f.check(tag and tag != "latest", f"{where}: base image {image} ({resolved}) needs a "
                                             "pinned tag (DL3006/DL3007)")
            f.check(resolved.startswith("debian:12"),
                    f"{where}: base {resolved}: install-deps.sh is written for Debian 12")
        shell_set = False
        for ln, ins, rest in s["instrs"]:
            w = f"Dockerfile:{ln} ({name})"
            if ins == "SHELL":
                shell_set = "pipefail" in rest
            if ins == "RUN":
                body = re.sub(r"^--mount=\S+\s+", "", rest)
                f.check(shell_set or "|" not in body,
                        f"{w}: RUN with a pipe needs SHELL [..., \"-o\", \"pipefail\", ...] (DL4006)")
                f.check(not re.search(r"(^|&&|;)\s*cd\s", body), f"{w}: use WORKDIR, not cd (DL3003)")
                f.check("sudo " not in body, f"{w}: no sudo (DL3004)")
                for tool in ("apt-get install", "apt install", "pip install", "npm install",
                             "curl ", "wget "):
                    if tool in body:
                        allowed = [p for p in EXTRA_PACKAGES.get(name, [])]
                        if tool == "apt-get install" and allowed:
                            pk = re.search(r"apt-get install (.*?)(?:&&|$)", body).group(1)
                            pk = [x for x in pk.split() if not x.startswith("-")]
                            ok = all(any(re.fullmatch(a, p.strip('"')) for a in allowed)
                                     for p in pk)
                            f.check(ok, f"{w}: packages {pk} are not the listed CUDA additions")
                            f.check("--no-install-recommends" in body and "-y" in body,
                                    f"{w}: apt-get install needs -y --no-install-recommends "
                                    "(DL3014/DL3015)")
                            f.check("rm -rf /var/lib/apt/lists" in body,
                                    f"{w}: remove /var/lib/apt/lists in the same RUN (DL3009)")
                        else:
                            f.fail(f"{w}: `{tool.strip()}` outside scripts/install-deps.sh: "
                                   "a second, untested install path")
                if "install-deps.sh" in body:
                    f.check("rm -rf /var/lib/apt/lists" in body,
                            f"{w}: remove /var/lib/apt/lists after install-deps.sh (DL3009)")
                if re.search(r"\bcmake -S\b", body):
                    conf = body.split("&&")[0].strip()
                    toks = shlex.split(conf)
                    f.check(toks[:len(ci_tokens)] == ci_tokens,
                            f"{w}: configure line {toks[:len(ci_tokens)]} differs from CI's "
                            f"scripts/test.sh ({ci_tokens})")
            if ins == "ADD":
                src = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
                f.check(all(re.match(r"(https?://|\$\{)", x) for x in src),
                        f"{w}: ADD of a local file: use COPY (DL3020)")
            if ins in ("CMD", "ENTRYPOINT"):
                f.check(rest.startswith("["), f"{w}: {ins} in exec (JSON) form (DL3025)")
                if rest.startswith("["):
                    json.loads(rest)
            if ins == "HEALTHCHECK":
                cmd = rest[rest.find("CMD") + 3:].strip() if "CMD" in rest else ""
                f.check(cmd.startswith("["), f"{w}: HEALTHCHECK CMD in exec form")
                if cmd.startswith("["):
                    json.loads(cmd)
        # What each builder installs, and how.
        runs = [r for _, i, r in s["instrs"] if i == "RUN"]
        if name.startswith("builder"):
            f.check(any(re.search(r"(^|\s)scripts/install-deps\.sh(\s|$)", r)
                        and "--runtime" not in r for r in runs),
                    f"{where}: a builder must run scripts/install-deps.sh (the CI path)")
        if name.startswith("runtime-"):
            kind = name[len("runtime-"):]
            f.check(kind in IMAGE_STAGES, f"{where}: a runtime stage for an unknown image {kind}")
            f.check(any(re.search(rf"install-deps\.sh --runtime={re.escape(kind)}(\s|$)", r)
                        for r in runs),
                    f"{where}: must run install-deps.sh --runtime={kind}")
        if name == "runtime":
            f.check(not any("install-deps.sh" in r for r in runs),
                    f"{where}: the shared runtime stage installs no packages; each image's own "
                    "runtime-KIND stage does")

    # Images: from the runtime stage, non-root, a healthcheck, ports that deploy/ uses.
    expect_ports = {"server": {"50051", "9090"}, "worker": {"9091"}, "worker-cuda": {"9091"}}
    for name in IMAGE_STAGES & set(st):
        chain = ancestry(name)
        f.check("runtime" in chain, f"Dockerfile stage {name}: must build on the runtime stage")
        f.check(f"runtime-{name}" in chain,
                f"Dockerfile stage {name}: must build on runtime-{name}, the stage with its libraries")
        ins = [(i, r) for _, i, r in st[name]["instrs"]]
        users = [r for i, r in ins if i == "USER"]
        f.check(users and users[-1].split(":")[0] not in ("0", "root"),
                f"Dockerfile stage {name}: the last USER must not be root (DL3002)")
        f.check(users and users[-1].split(":")[0] == "10001",
                f"Dockerfile stage {name}: USER 10001 (deploy/ sets runAsUser: 10001)")
        f.check(any(i == "HEALTHCHECK" for i, _ in ins), f"Dockerfile stage {name}: HEALTHCHECK")
        exposed = {p.split("/")[0] for i, r in ins if i == "EXPOSE" for p in r.split()}
        f.check(exposed == expect_ports[name],
                f"Dockerfile stage {name}: EXPOSE {sorted(exposed)} != {sorted(expect_ports[name])}")
        ep = [json.loads(r) for i, r in ins if i == "ENTRYPOINT"]
        f.check(ep and any(a.startswith("--flagfile=/opt/perfusion/etc/") for a in ep[-1]),
                f"Dockerfile stage {name}: ENTRYPOINT reads the image's flag file")
    runtime_runs = [r for _, i, r in st.get("runtime", {}).get("instrs", []) if i == "RUN"]
    f.check(any("useradd" in r and "--uid 10001" in r for r in runtime_runs),
            "Dockerfile runtime: creates the user with uid 10001")

    # deploy/ runs these images as uid 10001.
    for fn in ("server-deployment.yaml", "worker-deployment.yaml"):
        with open(os.path.join(dl.DEPLOY, "base", fn)) as d:
            dep = dl.yaml.safe_load(d)
        sc = dep["spec"]["template"]["spec"].get("securityContext", {})
        f.check(sc.get("runAsUser") == 10001, f"deploy/base/{fn}: runAsUser must be 10001")

    # .dockerignore keeps what the build copies from the main context.
    ignore = []
    if os.path.exists(os.path.join(dl.REPO, ".dockerignore")):
        with open(os.path.join(dl.REPO, ".dockerignore")) as d:
            ignore = [l.strip().lstrip("/") for l in d if l.strip() and not l.startswith("#")]
    copied = set()
    for _, ins, rest in instrs:
        if ins == "COPY" and "--from=" not in rest:
            parts = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
            copied.update(p for p in parts if p != ".")
    copied |= {"CMakeLists.txt", "proto", "server", "worker", "client", "scripts/install-deps.sh"}
    for path in sorted(copied):
        hit = [p for p in ignore if not p.startswith("!") and (
            fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/")
            or fnmatch.fnmatch(path.split("/")[0], p))]
        f.check(not hit, f".dockerignore pattern(s) {hit} exclude {path}, which the build needs")
    return instrs


def check_shared(f, shared):
    """The files the Dockerfile copies from the `shared` build context exist there."""
    needed = []
    for _, ins, rest in parse(DOCKERFILE):
        if ins == "COPY" and "--from=shared" in rest:
            needed += [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
    if not shared or not os.path.isdir(shared):
        print(f"shared folder {shared!r} not found: the shared-context files are not checked")
        return
    for n in needed:
        f.check(os.path.exists(os.path.join(shared, n)),
                f"Dockerfile copies {n} from the shared context, but {shared}/{n} is missing")


def check_runtime_libs(f, binaries):
    """Each library a binary loads comes from the install-deps.sh --runtime=KIND closure of the
    image that carries it."""
    with open(INSTALL_DEPS) as s:
        text = s.read()
    lists = {}
    for kind, names in RUNTIME_LISTS.items():
        pkgs = []
        for n in names:
            arr = bash_array(text, n)
            f.check(bool(arr), f"scripts/install-deps.sh: no {n} list")
            pkgs += [p for p in arr if "$" not in p]  # "${OTHER[@]}" is listed by name
        lists[kind] = pkgs
        dev = [p for p in pkgs if p.endswith("-dev")]
        f.check(not dev, f"install-deps.sh --runtime={kind} installs development packages: {dev}")
    f.check(not {"libtorch1.13", "libopenblas0-openmp"} & set(lists["server"] + lists["worker-cuda"]),
            "install-deps.sh: only the CPU worker's runtime gets Debian's LibTorch and OpenBLAS")
    bins = [b for b in binaries if os.path.exists(b)]
    if not bins:
        print("no built binaries given: the runtime library closure is not checked")
        return
    closures = {}
    for kind, pkgs in lists.items():
        code, out, err = dl.run(["apt-cache", "depends", "--recurse", "--no-recommends",
                                 "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces",
                                 "--no-enhances", *pkgs], timeout=120)
        if code != 0 or not out.strip():
            print(f"apt-cache depends failed ({err.strip()[:200]}): closure not checked")
            return
        closures[kind] = {l.strip() for l in out.splitlines() if l and not l.startswith(" ")}
        closures[kind] |= {"libc6", "libgcc-s1", "libstdc++6", "libzstd1", "zlib1g", "liblzma5",
                           "libcrypt1", "libselinux1", "libpcre2-8-0"}  # in every debian:12-slim
    for b in bins:
        kind = BINARY_IMAGE.get(os.path.basename(b))
        if not f.check(kind is not None, f"{b}: no image is known to carry this binary"):
            continue
        closure = closures[kind]
        code, out, err = dl.run(["ldd", b], timeout=60)
        if not f.check(code == 0, f"ldd {b} failed: {err}"):
            continue
        libs = sorted({os.path.realpath(m) for m in re.findall(r"=>\s+(/\S+)", out)})
        # dpkg knows each file under the path its package ships (/lib or /usr/lib: merged /usr).
        owners = {}
        candidates = libs + [l.replace("/usr/lib/", "/lib/", 1) for l in libs]
        _c, o2, _e = dl.run(["dpkg", "-S", *candidates], timeout=120)
        for line in o2.splitlines():
            pkgs, _, path = line.partition(": ")
            owners[path.strip().replace("/lib/", "/usr/lib/", 1)
                   if path.startswith("/lib/") else path.strip()] = pkgs.split(",")[0].split(":")[0]
        missing = {}
        for lib in libs:
            pkg = owners.get(lib)
            if pkg is None:
                missing[lib] = "(no package owns it)"
            elif pkg not in closure:
                missing[lib] = pkg
        f.check(not missing, f"{os.path.basename(b)} loads libraries that "
                             f"`install-deps.sh --runtime={kind}` does not install: {missing}")
        print(f"{os.path.basename(b)}: {len(libs)} libraries, all from the {kind} image's runtime "
              "closure" if not missing else f"{os.path.basename(b)}: {len(missing)} libraries outside")


def check_dockerfilelint(f, npm_dir):
    """Runs dockerfilelint (npm) when it is installed or installable; reports findings other
    than the two known false positives of that linter (it does not know ARG-based or stage
    FROM lines, and its HEALTHCHECK option regex rejects --start-period)."""
    exe = dl.tool("dockerfilelint", "DOCKERFILELINT")
    if not exe and npm_dir and dl.tool("npm"):
        exe = os.path.join(npm_dir, "node_modules", ".bin", "dockerfilelint")
        if not os.path.exists(exe):
            os.makedirs(npm_dir, exist_ok=True)
            code, out, err = dl.run(["npm", "install", "--prefix", npm_dir, "--no-audit",
                                     "--no-fund", "--loglevel=error",
                                     f"dockerfilelint@{DOCKERFILELINT_VERSION}"], timeout=180)
            if code != 0:
                print(f"dockerfilelint: not run (npm install failed: {err.strip()[:300]})")
                return
    if not exe or not os.path.exists(exe):
        print("dockerfilelint: not run (not installed, and npm is missing)")
        return
    code, out, err = dl.run([exe, "--json", DOCKERFILE], timeout=60)
    try:
        report = json.loads(out)
    except ValueError:
        f.fail(f"dockerfilelint output is not JSON: {out[:300]}{err[:300]}")
        return
    lines = open(DOCKERFILE).read().split("\n")
    st, _, _ = stages(parse(DOCKERFILE))
    kept = []
    for fdoc in report.get("files", []):
        for issue in fdoc.get("issues", []):
            ln = int(issue.get("line", 0))
            text = lines[ln - 1] if 0 < ln <= len(lines) else ""
            title = issue.get("title", "")
            if title == "Base Image Missing Tag" and re.match(
                    r"FROM\s+(\$\{\w+\}|" + "|".join(map(re.escape, st)) + r")\s", text):
                continue  # tags are checked above on the resolved ARG defaults
            if title == "Invalid Argument Format" and text.startswith("HEALTHCHECK") and \
                    "--start-period" in text:
                continue  # its option regex splits --start-period at the hyphen
            kept.append(f"line {ln}: {title}: {issue.get('description', '')}")
    f.check(not kept, "dockerfilelint findings:\n  " + "\n  ".join(kept))
    print(f"dockerfilelint {DOCKERFILELINT_VERSION}: {len(kept)} findings after the known false "
          "positives")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", action="append", default=[])
    ap.add_argument("--shared", default=os.environ.get(
        "PERFUSION_SHARED_DIR", os.path.join(dl.REPO, "..", "shared")))
    ap.add_argument("--npm-dir", default=None)
    args = ap.parse_args()
    dl.need_yaml()
    f = dl.Failures("deploy_dockerfile")
    check_static(f)
    check_shared(f, args.shared)
    check_runtime_libs(f, args.binary)
    check_dockerfilelint(f, args.npm_dir)
    return f.finish()


if __name__ == "__main__":
    sys.exit(main())
