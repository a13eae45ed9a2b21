import Foundation
import Logging
import PVSchedAttach
import PVSchedControl
import PVSchedCore
import PVSchedHost
import PVSchedLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Finds, on its own, the QEMU processes of the host that map a pvsched region and
/// attaches them (`discover = yes`): the node agent's way to serve VMs it is told
/// nothing about, such as KubeVirt's, whose libvirtd runs inside each virt-launcher
/// pod and whose /dev/shm is the pod's. Every few seconds it reads /proc: a process
/// whose name starts with `qemu`, run by an allowed user (root and the users QEMU
/// runs as under libvirt, and KubeVirt's 107 inside a pod; never another local user), that maps a file
/// named `pvsched-*` from its /dev/shm, is attached with its vCPU threads found by
/// name (libvirt starts QEMU with `debug-threads=on`) and the region as the process
/// sees it (`/proc/PID/root/dev/shm/...`). The VM is named after QEMU's `-name
/// guest=` (KubeVirt: `NAMESPACE_NAME`). A process another path serves is left to
/// it (`leftTo`: libvirt's own QEMUs while the libvirt follower is on, which attaches
/// them with their domains' settings and UUIDs).
final class QEMUDiscovery: Sendable {
    private let handler: ControlHandler
    private let allowedUsers: Set<UInt32>
    /// Whether a found process is another path's to serve.
    private let leftTo: @Sendable (_ pid: Int32, _ found: Candidate) -> Bool
    private let logger: Logger
    private let running = Atomic(true)
    private let thread = Mutex<PVSchedCore.Thread?>(nil)
    /// Processes looked at already (pid and start time), attached or not.
    private let seen = Mutex<Set<String>>([])
    static let intervalUs: UInt32 = 2_000_000

    init(handler: ControlHandler, allowedUsers: Set<UInt32>, logger: Logger,
         leftTo: @escaping @Sendable (_ pid: Int32, _ found: Candidate) -> Bool = { _, _ in false }) throws(ThreadError) {
        self.handler = handler
        self.allowedUsers = allowedUsers
        self.leftTo = leftTo
        self.logger = logger
        let t = try PVSchedCore.Thread(name: "pvs-discover") { [weak self] in
            while let self, self.running.load(ordering: .relaxed) {
                self.scan()
                var slept: UInt32 = 0
                while slept < Self.intervalUs && self.running.load(ordering: .relaxed) { usleep(100_000); slept += 100_000 }
            }
        }
        thread.withLock { $0 = t }
    }

    /// Root, and the users QEMU runs as under libvirt (`libvirt-qemu`, `qemu`): system
    /// users that only root's services run processes as.
    static var defaultUsers: Set<UInt32> {
        var users: Set<UInt32> = [0]
        for name in ["libvirt-qemu", "qemu"] { if let pw = getpwnam(name) { users.insert(pw.pointee.pw_uid) } }
        return users
    }

    /// KubeVirt runs QEMU as uid 107 inside the virt-launcher pod. On the host that uid
    /// may be anyone's, so a process of it counts only inside a pod's cgroup (which
    /// only the kubelet, as root, makes).
    static let kubeVirtUID: UInt32 = 107

    /// Whether process `pid`, run by `uid`, was started by a service trusted to run VMs.
    static func trusted(pid: Int32, uid: UInt32, allowedUsers: Set<UInt32>) -> Bool {
        if allowedUsers.contains(uid) { return true }
        guard uid == kubeVirtUID, let cgroup = read("/proc/\(pid)/cgroup") else { return false }
        return cgroup.split(separator: "\n").contains { $0.contains("/kubepods") }
    }

    func stop() {
        running.store(false, ordering: .relaxed)
        thread.takeAndJoin()
    }

    /// One look at /proc.
    func scan() {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return }
        for e in entries {
            guard let pid = Int32(e), pid > 1, let found = Self.candidate(pid: pid, allowedUsers: allowedUsers) else { continue }
            let key = "\(pid):\(found.startTime)"
            guard seen.withLock({ $0.insert(key).inserted }) else { continue }
            // Served already (by libvirt's follower, the state file, or by hand): left as it is.
            func served() -> Bool {
                handler.host.sessions.contains { s in s.state == .running && (s as? AttachedVMSession)?.report.process == pid }
            }
            if served() { continue }
            if leftTo(pid, found) {
                logger.debug("QEMU process found, left to another path", metadata: ["vm": "\(found.name)", "pid": "\(pid)"])
                continue
            }
            var p = VMAttach.Params()
            p.name = found.name
            p.pid = pid
            p.threadNames = VCPUThreadNaming.qemu.rawValue
            p.shm = found.region
            switch handler.handle(ControlRequest(id: .null, method: VMAttach.name, params: RequestParams(p.encoded))) {
            case .success:
                logger.info("QEMU process found and attached", metadata: ["vm": "\(found.name)", "pid": "\(pid)", "region": "\(found.region)"])
            case .failure(let error):
                // Attached meanwhile by another path (libvirt's follower, at the domain's start): one VM, no warning.
                if served() { continue }
                logger.warning("QEMU process found, not attached", metadata: ["pid": "\(pid)", "error": "\(error)"])
            }
        }
        // Forget processes that are gone (their pids come back for others).
        seen.withLock { s in
            s = s.filter { key in
                guard let pid = Int32(key.split(separator: ":")[0]) else { return false }
                return access("/proc/\(pid)", F_OK) == 0
            }
        }
    }

    /// What discovery needs of a process: its name for the VM, its region, its start time.
    struct Candidate: Equatable {
        var name: String
        /// QEMU's `-name guest=` as given (libvirt's domain name), nil without one.
        var guestName: String?
        var region: String
        var startTime: UInt64
    }

    /// Process `pid` as a VM to attach, or nil: not QEMU, not an allowed user, no pvsched region.
    static func candidate(pid: Int32, allowedUsers: Set<UInt32>) -> Candidate? {
        guard let comm = read("/proc/\(pid)/comm"), comm.hasPrefix("qemu") else { return nil }
        guard let owner = SafeOpen.Owner.process(pid), trusted(pid: pid, uid: owner.uid, allowedUsers: allowedUsers) else { return nil }
        guard let maps = read("/proc/\(pid)/maps", limit: 16 << 20) else { return nil }
        guard let region = regionPath(maps: maps) else { return nil }
        guard let start = ProcessIdentity.startTime(of: pid) else { return nil }
        let cmdline = (read("/proc/\(pid)/cmdline") ?? "").split(separator: "\0").map(String.init)
        return Candidate(name: vmName(cmdline: cmdline, pid: pid), guestName: guestName(cmdline: cmdline),
                         region: "/proc/\(pid)/root\(region)", startTime: start)
    }

    /// The first `/dev/shm/pvsched-*` file mapped (not deleted), as the process names it.
    static func regionPath(maps: String) -> String? {
        for line in maps.split(separator: "\n") {
            guard let slash = line.firstIndex(of: "/") else { continue }
            let path = line[slash...]
            guard path.hasPrefix("/dev/shm/pvsched-"), !path.hasSuffix("(deleted)") else { continue }
            let name = path.dropFirst("/dev/shm/".count)
            guard name.count <= 200, !name.contains("/"),
                  name.unicodeScalars.allSatisfy({ $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || "-_.".unicodeScalars.contains($0)) })
            else { continue }
            return String(path)
        }
        return nil
    }

    /// `-name guest=NAME,...` (libvirt, KubeVirt) made a VM name; else `qemuPID`.
    static func vmName(cmdline: [String], pid: Int32) -> String {
        guestName(cmdline: cmdline).flatMap(vmName(from:)) ?? "qemu\(pid)"
    }

    /// The guest's name in QEMU's last `-name` option (`guest=NAME` or a bare first
    /// part, `,,` a comma as QEMU reads it), nil without one.
    static func guestName(cmdline: [String]) -> String? {
        var raw: String?
        for (i, a) in cmdline.enumerated() where a == "-name" && i + 1 < cmdline.count {
            raw = nil
            for (n, part) in qemuOptionParts(cmdline[i + 1]).enumerated() {
                if part.hasPrefix("guest=") { raw = String(part.dropFirst(6)) } else if n == 0, !part.contains("=") { raw = part }
            }
        }
        return raw
    }

    /// A QEMU option value split at its commas, `,,` kept as one comma.
    static func qemuOptionParts(_ value: String) -> [String] {
        var parts: [String] = [], current = ""
        var chars = value.makeIterator()
        var pending = chars.next()
        while let c = pending {
            pending = chars.next()
            if c == "," {
                if pending == "," { current.append(","); pending = chars.next() } else { parts.append(current); current = "" }
            } else {
                current.append(c)
            }
        }
        parts.append(current)
        return parts
    }

    /// A name another program gave a VM (QEMU's `-name`, a libvirt domain) made a VM
    /// name: letters, digits, '.', '_' and '-' kept, anything else '_', at most 64
    /// bytes; nil when nothing is left or it is all digits (VMs are also named by number).
    static func vmName(from raw: String) -> String? {
        let cleaned = String(raw.unicodeScalars.map { s -> Character in
            (s.isASCII && (s.properties.isAlphabetic || ("0"..."9").contains(s) || s == "." || s == "_" || s == "-")) ? Character(s) : "_"
        }.prefix(64))
        return cleaned.isEmpty || UInt64(cleaned) != nil ? nil : cleaned
    }

    private static func read(_ path: String, limit: Int = 1 << 16) -> String? {
        guard let h = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? h.close() }
        guard let d = try? h.read(upToCount: limit) else { return nil }
        return String(decoding: d, as: UTF8.self).trimmingCharacters(in: .newlines)
    }
}
