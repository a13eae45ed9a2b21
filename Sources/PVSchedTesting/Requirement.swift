#if canImport(Glibc)
import Glibc
#endif

/// Something a test needs from the machine. A test whose requirement is missing
/// is skipped with the reason, unless CI sets `PVSCHED_REQUIRE_<NAME>=1`: then it
/// runs and fails, so that a green CI means the test really ran.
public enum Requirement: String, CaseIterable, Sendable {
    case kvm = "KVM"
    case root = "ROOT"
    case realTime = "RT"
    case qemu = "QEMU"
    case bpf = "BPF"
    /// Building and installing the Debian packages: root, dpkg-deb, dkms, systemd-analyze.
    case packaging = "PACKAGING"
    /// systemd's tools for a service without systemd as PID 1: systemd-socket-activate, systemd-analyze.
    case systemdTools = "SYSTEMD"
    /// Validating the Kubernetes manifests offline: kubernetes-validate (PyPI) and python3.
    case manifests = "MANIFESTS"
    /// libvirt's daemon and client (libvirt-daemon-system, libvirt-clients).
    case libvirt = "LIBVIRT"
    /// Root and a cpu cgroup hierarchy (v1's cpu controller, or v2 with cpu enabled at its root).
    case cgroups = "CGROUPS"

    /// Whether this machine has it.
    public var isMet: Bool {
        switch self {
        case .kvm: return access("/dev/kvm", R_OK | W_OK) == 0
        case .root, .bpf: return geteuid() == 0
        case .realTime:
            var p = sched_param(sched_priority: 1)
            var old = sched_param()
            let policy = sched_getscheduler(0)
            _ = sched_getparam(0, &old)
            guard sched_setscheduler(0, SCHED_FIFO, &p) == 0 else { return false }
            _ = sched_setscheduler(0, policy, &old)
            return true
        case .qemu:
            // QEMU, and what the Linux test guest is built from (scripts/build-linux-guest.sh).
            guard access("/usr/bin/qemu-system-x86_64", X_OK) == 0, access("/bin/busybox", X_OK) == 0,
                  access("/usr/bin/cyclictest", X_OK) == 0, let dir = opendir("/lib/modules") else { return false }
            defer { closedir(dir) }
            while let e = readdir(dir) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                if name.hasSuffix("-cloud-amd64"), access("/lib/modules/\(name)/build", F_OK) == 0 { return true }
            }
            return false
        case .packaging:
            return geteuid() == 0 && ["dpkg-deb", "dpkg", "dkms", "systemd-analyze"].allSatisfy { Self.executable($0) != nil }
        case .systemdTools:
            return ["systemd-socket-activate", "systemd-analyze"].allSatisfy { Self.executable($0) != nil }
        case .manifests:
            return ["kubernetes-validate", "python3"].allSatisfy { Self.executable($0) != nil }
        case .cgroups:
            var v2 = false
            if let f = fopen("/sys/fs/cgroup/cgroup.controllers", "r") {
                var line = [CChar](repeating: 0, count: 512)
                if fgets(&line, 512, f) != nil {
                    v2 = String(cString: line).split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("cpu")
                }
                fclose(f)
            }
            return geteuid() == 0 && (access("/sys/fs/cgroup/cpu/cpu.shares", W_OK) == 0
                || access("/sys/fs/cgroup/cpu,cpuacct/cpu.shares", W_OK) == 0 || v2)
        case .libvirt:
            return access("/usr/sbin/libvirtd", X_OK) == 0 && access("/usr/sbin/virtlogd", X_OK) == 0 && access("/usr/bin/virsh", X_OK) == 0
        }
    }

    /// Where `name` is on PATH (and in the sbin directories), if anywhere.
    public static func executable(_ name: String) -> String? {
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        let dirs: [String] = path.split(separator: ":").map(String.init) + ["/usr/sbin", "/sbin", "/usr/bin"]
        for dir in dirs {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// Whether CI demands it (`PVSCHED_REQUIRE_<NAME>=1`).
    public var isRequired: Bool {
        guard let v = getenv("PVSCHED_REQUIRE_\(rawValue)") else { return false }
        return String(cString: v) == "1"
    }

    /// Run the test: the requirement is met, or required (and the test will fail).
    public var shouldRun: Bool { isMet || isRequired }

    /// Why a test is skipped without it.
    public var reason: String {
        switch self {
        case .kvm: return "needs /dev/kvm (run as root on a KVM host)"
        case .root: return "needs root"
        case .realTime: return "needs real-time scheduling (root or CAP_SYS_NICE)"
        case .qemu: return "needs qemu-system-x86_64 and the Linux guest's packages (linux-image-cloud-amd64, linux-headers-cloud-amd64, busybox-static, rt-tests, cpio)"
        case .bpf: return "needs the bpf syscall (root)"
        case .packaging: return "needs root, dpkg-deb and dkms (apt-get install dkms) and systemd-analyze (systemd)"
        case .systemdTools: return "needs systemd-socket-activate and systemd-analyze (apt-get install systemd)"
        case .manifests: return "needs python3 and kubernetes-validate (pip install kubernetes-validate)"
        case .libvirt: return "needs libvirt (apt-get install libvirt-daemon-system libvirt-clients)"
        case .cgroups: return "needs root and a cpu cgroup hierarchy (cgroup v1's cpu controller, or v2 with cpu enabled)"
        }
    }

    /// Throws when the requirement is missing (a test that runs because CI requires it).
    public func check() throws {
        guard isMet else { throw RequirementMissing(requirement: self) }
    }
}

/// A required capability is missing on this machine.
public struct RequirementMissing: Error, CustomStringConvertible {
    public let requirement: Requirement
    public var description: String {
        "PVSCHED_REQUIRE_\(requirement.rawValue)=1 but this machine lacks it: \(requirement.reason)"
    }
}
