#!/usr/bin/env bash
# Builds pvsched's Debian packages into DIR:
#   pvsched_VERSION_amd64.deb           the host: daemon and CLI (Swift runtime linked in),
#                                       the lab (demo, bench), systemd units, config file,
#                                       man page, bash/zsh/fish completions, BPF objects, docs
#   pvsched-guest-dkms_VERSION_all.deb  the guest module's source for DKMS
# From this checkout, with dpkg-deb; no network (the Swift packages are resolved already).
#   bash scripts/package.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"
out=${1:?usage: scripts/package.sh DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
version=$(tr -d ' \n' < VERSION)
scratch=.build/package
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- build ---
# The man page first: the plugin builds the products its own way; the static build
# after it links them again with the Swift runtime inside.
swift package --scratch-path "$scratch" plugin generate-manual >/dev/null
swift build --scratch-path "$scratch" -c release --static-swift-stdlib --product pvsched >/dev/null
swift build --scratch-path "$scratch" -c release --static-swift-stdlib --product pvsched-lab >/dev/null
bin="$scratch/release"
man=$(find "$scratch/plugins/GenerateManual/outputs/pvsched" -name 'pvsched.1' | head -1)
[ -f "$man" ] || { echo "package.sh: the man page was not generated" >&2; exit 1; }
"$bin/pvsched" --version | grep -q "^$version " || { echo "package.sh: the binary says $("$bin/pvsched" --version), not $version" >&2; exit 1; }

# --- the host package ---
root="$work/pvsched"
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/pvsched/conf.d" \
    "$root/usr/share/man/man1" "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d" "$root/usr/lib/pvsched/bpf" "$root/usr/share/doc/pvsched/docs" \
    "$root/usr/share/pvsched/deploy"
install -m 0755 "$bin/pvsched" "$bin/pvsched-lab" "$root/usr/bin/"
install -m 0644 packaging/systemd/pvsched.service packaging/systemd/pvsched.socket "$root/lib/systemd/system/"
install -m 0644 packaging/pvsched.conf "$root/etc/pvsched/pvsched.conf"
gzip -9n < "$man" > "$root/usr/share/man/man1/pvsched.1.gz"
"$bin/pvsched" --generate-completion-script bash > "$root/usr/share/bash-completion/completions/pvsched"
"$bin/pvsched" --generate-completion-script zsh > "$root/usr/share/zsh/vendor-completions/_pvsched"
"$bin/pvsched" --generate-completion-script fish > "$root/usr/share/fish/vendor_completions.d/pvsched.fish"
find "$scratch/plugins/outputs" -path '*GuestImagePlugin/guest-build/*.bpf.o' -exec install -m 0644 {} "$root/usr/lib/pvsched/bpf/" \;
[ -f "$root/usr/lib/pvsched/bpf/kvm_events.bpf.o" ] || { echo "package.sh: BPF objects not found" >&2; exit 1; }
install -m 0644 README.md "$root/usr/share/doc/pvsched/"
install -m 0644 docs/*.md "$root/usr/share/doc/pvsched/docs/"
cp -r deploy/. "$root/usr/share/pvsched/deploy/"
printf 'pvsched %s\nBuilt from this source tree; see README.md.\n' "$version" > "$root/usr/share/doc/pvsched/copyright"
sed "s/@VERSION@/$version/" packaging/host/control.in > "$root/DEBIAN/control"
echo "Installed-Size: $(du -sk "$root" | cut -f1)" >> "$root/DEBIAN/control"
echo /etc/pvsched/pvsched.conf > "$root/DEBIAN/conffiles"
for s in postinst prerm postrm; do install -m 0755 "packaging/host/$s" "$root/DEBIAN/$s"; done
dpkg-deb --root-owner-group -Zxz --build "$root" "$out/pvsched_${version}_amd64.deb" >/dev/null

# --- the guest package (DKMS) ---
groot="$work/guest"
src="$groot/usr/src/pvsched-guest-$version"
install -d "$groot/DEBIAN" "$src/include" "$groot/etc/modprobe.d" "$groot/usr/share/doc/pvsched-guest-dkms"
install -m 0644 Guest/linux-module/pvsched_guest.c Guest/linux-module/Kbuild "$src/"
install -m 0644 Sources/PVSchedABI/include/pvsched_abi.h "$src/include/"
printf '# Built by DKMS (dkms.conf); by hand: make -C /lib/modules/$(uname -r)/build M=$PWD PVSCHED_ABI=$PWD/include\n' > "$src/Makefile"
printf 'KDIR ?= /lib/modules/$(shell uname -r)/build\nall:\n\t$(MAKE) -C $(KDIR) M=$(CURDIR) PVSCHED_ABI=$(CURDIR)/include modules\nclean:\n\t$(MAKE) -C $(KDIR) M=$(CURDIR) clean\n' >> "$src/Makefile"
sed "s/@VERSION@/$version/" packaging/guest/dkms.conf.in > "$src/dkms.conf"
install -m 0644 packaging/guest/pvsched-guest.modprobe.conf "$groot/etc/modprobe.d/pvsched-guest.conf"
install -m 0644 docs/linux-guests.md "$groot/usr/share/doc/pvsched-guest-dkms/"
printf 'pvsched-guest-dkms %s\nGPL-2.0 (the module declares MODULE_LICENSE("GPL")).\n' "$version" > "$groot/usr/share/doc/pvsched-guest-dkms/copyright"
sed "s/@VERSION@/$version/" packaging/guest/control.in > "$groot/DEBIAN/control"
echo /etc/modprobe.d/pvsched-guest.conf > "$groot/DEBIAN/conffiles"
for s in postinst prerm; do sed "s/@VERSION@/$version/" "packaging/guest/$s" > "$groot/DEBIAN/$s"; chmod 0755 "$groot/DEBIAN/$s"; done
dpkg-deb --root-owner-group -Zxz --build "$groot" "$out/pvsched-guest-dkms_${version}_all.deb" >/dev/null

ls -1 "$out"/pvsched_"$version"_amd64.deb "$out"/pvsched-guest-dkms_"$version"_all.deb
