#!/usr/bin/env bash
# Install the system packages pctop needs on Debian 12 / Ubuntu, as root.
# Idempotent: apt runs only when something is missing, so repeated
# `make test` / `make demo` stay fast and work offline once set up.
set -euo pipefail

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

# qemu-system-x86: `pctop demo --vmm qemu` and its tests; libcap2-bin: capsh for the doctor tests;
# nftables: the link-failure tests drop and lose packets on their own veth link;
# prometheus: the exporter's tests scrape it with a real Prometheus and check it with promtool.
for p in python3 python3-venv python3-pip python3-bpfcc iproute2 gcc libc6-dev qemu-system-x86 libcap2-bin nftables prometheus; do
    have "$p" || need+=("$p")
done

# bcc compiles the probes against the running kernel's own headers, else its
# BTF (/sys/kernel/btf/vmlinux, dumped by bpftool), else the distribution's
# generic headers standing in (pctop/probe_build.py; `pctop doctor --fix`
# links them). The stand-in is fetched too, as the last resort should a BTF
# build fail.
rel=$(uname -r)
if [ -f /sys/kernel/btf/vmlinux ] && ! command -v bpftool >/dev/null && [ ! -x /usr/sbin/bpftool ]; then
    need+=("BPFTOOL")
fi
if [ ! -d "/lib/modules/$rel/build/include" ] && ! ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-generic >/dev/null 2>&1; then
    need+=("HEADERS")
fi

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages (${need[*]}); run as root or install them with sudo" >&2
    exit 1
fi
echo "setup: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
pkgs=()
for p in "${need[@]}"; do
    if [ "$p" = HEADERS ]; then
        for h in "linux-headers-$rel" linux-headers-amd64 linux-headers-generic; do
            if apt-cache show "$h" >/dev/null 2>&1; then pkgs+=("$h"); break; fi
        done
    elif [ "$p" = BPFTOOL ]; then
        # Debian packages it; where apt has none, the headers above must do.
        if apt-cache show bpftool >/dev/null 2>&1; then pkgs+=(bpftool); fi
    else
        pkgs+=("$p")
    fi
done
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
