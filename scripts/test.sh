#!/usr/bin/env bash
# The one command for all the set-up and all the tests: installs what the tests
# need (Debian packages with apt-get when run as root), builds, and runs every test.
# CI (.ci/run) calls this same script with PVSCHED_REQUIRE_* set, which turns
# "skipped: needs /dev/kvm" (or root, RT) into failures.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"
command -v swift >/dev/null || { echo "swift toolchain not found (expected at /opt/swift)" >&2; exit 1; }

# What the tests use beyond the toolchain:
#   curl        - scrapes the daemon's Prometheus endpoint
#   util-linux  - setpriv, to act as another user against the control socket
#   libbpf1     - libbpf.so.1, which loads the kernel KVM event source (BPF/kvm_events.bpf.c)
#   the Linux test guest (scripts/build-linux-guest.sh) and unmodified QEMU to run it:
#   qemu-system-x86, linux-image-cloud-amd64, linux-headers-cloud-amd64 (and make, to
#   build the pvsched_guest module), busybox-static, rt-tests (cyclictest), cpio
#   the packaging tests: dkms (builds the guest package's module), systemd (systemd-analyze
#   verifies the units, systemd-socket-activate stands in for pvsched.socket), python3 and
#   python3-venv (the KubeVirt hook; kubernetes-validate from PyPI checks the manifests)
#   libvirt-daemon-system, libvirt-clients: the libvirt tests run a real libvirtd (started by
#   the tests where no service manager runs it) and define domains with virsh
PACKAGES=(curl util-linux libbpf1 qemu-system-x86 linux-image-cloud-amd64 linux-headers-cloud-amd64 make
          busybox-static rt-tests cpio dkms systemd python3 python3-venv libvirt-daemon-system libvirt-clients)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "missing Debian packages: ${missing[*]} (run as root to install them; the tests that need them will fail)" >&2
    fi
fi

# kubernetes-validate (PyPI) in a virtual environment of its own under .build.
if ! command -v kubernetes-validate >/dev/null; then
    if [ ! -x .build/tools-venv/bin/kubernetes-validate ]; then
        python3 -m venv .build/tools-venv && .build/tools-venv/bin/pip install -q kubernetes-validate \
            || echo "kubernetes-validate not installed: the manifest test will skip (or fail under PVSCHED_REQUIRE_MANIFESTS=1)" >&2
    fi
    export PATH="$PATH:$PWD/.build/tools-venv/bin"
fi

swift --version
swift build
# The Debian packages, built once from this checkout for the packaging test (as root, with dkms).
if [ "$(id -u)" = 0 ] && command -v dpkg-deb >/dev/null && command -v dkms >/dev/null; then
    rm -rf .build/debs
    bash scripts/package.sh .build/debs
    export PVSCHED_PACKAGE_DIR="$PWD/.build/debs"
fi
# The Linux guest for the QEMU tests (a no-op when its packages are missing: those tests then skip).
bash scripts/build-linux-guest.sh || echo "Linux test guest not built: the QEMU tests will skip (or fail under PVSCHED_REQUIRE_QEMU=1)" >&2
# Serially: many tests run real VMs, real-time threads and a daemon on a 2-core machine, and
# several of them time what they see; run side by side they starve each other.
# Every file a test makes (regions in /dev/shm, sockets and exports in /tmp) is
# removed by the test: whatever is left afterwards fails the run.
leftovers() { ls -d /dev/shm/pvsched* /dev/shm/pvs-* /tmp/pvsched-* 2>/dev/null | sort || true; }
before=$(leftovers)
swift test --no-parallel
after=$(leftovers)
left=$(comm -13 <(echo "$before") <(echo "$after") | grep -v '^$' || true)
if [ -n "$left" ]; then
    echo "tests left files behind:" >&2
    echo "$left" >&2
    exit 1
fi
# The libFuzzer targets (ELF loader, verifier + interpreter, shared area, control
# requests), each for a bounded time from the corpus in Fuzz/Corpus.
# PVSCHED_FUZZ_SECONDS=0 skips them.
if [ "${PVSCHED_FUZZ_SECONDS:-15}" != 0 ]; then
    bash Fuzz/run.sh "${PVSCHED_FUZZ_SECONDS:-15}"
fi
