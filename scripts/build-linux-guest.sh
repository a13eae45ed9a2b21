#!/usr/bin/env bash
# Builds the Linux test guest for `pvsched demo --vmm qemu` and the QEMU tests:
# Debian's cloud kernel, and a reproducible initramfs with busybox, rt-tests'
# cyclictest, util-linux's chrt and the pvsched_guest module (Guest/linux-module)
# built against the matching Debian headers.
# Inputs (Debian packages, installed by scripts/test.sh): linux-image-cloud-amd64,
# linux-headers-cloud-amd64, busybox-static, rt-tests, util-linux, cpio.
# Output: .build/linux-guest/{vmlinuz,initrd.gz,pvsched_guest.ko}
# usage: build-linux-guest.sh [OUTPUT_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/.build/linux-guest}"
kver="$(ls /lib/modules 2>/dev/null | grep -- '-cloud-amd64$' | sort -V | tail -1 || true)"
[ -n "$kver" ] || { echo "no Debian cloud kernel: apt-get install linux-image-cloud-amd64 linux-headers-cloud-amd64" >&2; exit 2; }
[ -f "/boot/vmlinuz-$kver" ] || { echo "/boot/vmlinuz-$kver missing: apt-get install linux-image-cloud-amd64" >&2; exit 2; }
[ -d "/lib/modules/$kver/build" ] || { echo "headers for $kver missing: apt-get install linux-headers-cloud-amd64" >&2; exit 2; }
for tool in /bin/busybox /usr/bin/cyclictest /usr/bin/chrt; do
    [ -x "$tool" ] || { echo "$tool missing: apt-get install busybox-static rt-tests util-linux" >&2; exit 2; }
done
command -v cpio >/dev/null || { echo "cpio missing: apt-get install cpio" >&2; exit 2; }

mkdir -p "$out"
# A fixed scratch path: the module embeds its build path, so a random one would
# make every build differ.
work="$out/.work"; rm -rf "$work"; mkdir -p "$work"; trap 'rm -rf "$work"' EXIT
# The module, built out of tree in a scratch copy (kbuild writes next to the sources).
cp "$root"/Guest/linux-module/{pvsched_guest.c,Kbuild,Makefile} "$work/"
make -s -C "/lib/modules/$kver/build" M="$work" PVSCHED_ABI="$root/Sources/PVSchedABI/include" modules >"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; exit 1; }
cp "$work/pvsched_guest.ko" "$out/pvsched_guest.ko"

# The initramfs tree.
tree="$work/root"
mkdir -p "$tree"/{bin,lib,lib64,usr/bin,proc,sys,dev,tmp}
cp /bin/busybox "$tree/bin/busybox"
cp "$root/Guest/linux-initramfs/init" "$tree/init"; chmod 755 "$tree/init"
cp "$out/pvsched_guest.ko" "$tree/pvsched_guest.ko"
for bin in /usr/bin/cyclictest /usr/bin/chrt; do
    cp "$bin" "$tree/usr/bin/"
    ldd "$bin" | awk '/=> \//{print $3} /^[ \t]*\/lib/{print $1}' | while read -r lib; do
        dest="$tree$(dirname "$lib")"; mkdir -p "$dest"; cp -L "$lib" "$dest/"
    done
done
# Reproducible: fixed times, sorted names, no owner, gzip without a timestamp.
find "$tree" -exec touch -h -d @0 {} +
(cd "$tree" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --reproducible --quiet) | gzip -n -9 > "$out/initrd.gz"
cp "/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "$kver" > "$out/kernel-version"
echo "linux guest: $out (kernel $kver)"
