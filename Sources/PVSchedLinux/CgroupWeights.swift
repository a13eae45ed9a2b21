import Logging
import PVSchedCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The cgroup side of a fair-class boost. The scheduler compares a thread with the
/// threads of its own cgroup only; against everything outside, its cgroup competes,
/// with the cgroup's weight (`cpu.shares` on cgroup v1, `cpu.weight` on v2), and so
/// does each ancestor at its own level. libvirt puts every vCPU thread alone in its
/// own cgroup (`machine/qemu-N-NAME.libvirt-qemu/vcpuN`): there a nice -20 boost
/// changes nothing the scheduler compares. While such a thread is boosted, its cgroup
/// and every ancestor below the hierarchy's root get the weight of a thread at the
/// boost's nice (nice -20: shares 88761, weight 8668), and get their own back when
/// the last boost under them ends (counted per cgroup: a VM's cgroup stays raised
/// while any of its vCPUs is boosted).
///
/// Only a thread alone in its cgroup is served (raising a shared cgroup would boost
/// every thread in it), and only through directories owned by root (a cgroup
/// delegated to a user is that user's to weigh). A value someone else changed while
/// raised is left as they set it. Each raise is told to the `BoostGuardian` first,
/// which puts the value back if the daemon dies; without a guardian taking the
/// record, nothing is raised.
public final class CgroupWeights: Sendable {
    /// Which cgroup hierarchy holds the cpu controller.
    public enum Version: Sendable, Equatable {
        /// v1: the `cpu` controller's own mount; `cpu.shares` (2-262144, default 1024).
        case v1
        /// v2: the unified mount; `cpu.weight` (1-10000, default 100).
        case v2
        var file: String { self == .v1 ? "cpu.shares" : "cpu.weight" }
        var memberFile: String { self == .v1 ? "tasks" : "cgroup.threads" }
    }

    /// Where the hierarchy is mounted, and which version it is.
    public struct Hierarchy: Sendable, Equatable {
        public var mount: String
        public var version: Version
        public init(mount: String, version: Version) { self.mount = mount; self.version = version }

        /// This host's cpu hierarchy: v1's cpu mount, else v2 when its root offers the cpu controller.
        public static func detect() -> Hierarchy? {
            for m in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"] where access(m + "/cpu.shares", F_OK) == 0 {
                return Hierarchy(mount: m, version: .v1)
            }
            if let c = LinuxScheduling.readSmallFile("/sys/fs/cgroup/cgroup.controllers"),
               c.split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("cpu") {
                return Hierarchy(mount: "/sys/fs/cgroup", version: .v2)
            }
            return nil
        }

        /// The cgroup path (relative to the mount, starting with "/") of `thread` of
        /// `process` in this hierarchy (`/proc/PID/task/TID/cgroup`).
        public func cgroupPath(thread: Int32, process: Int32) -> String? {
            guard let text = LinuxScheduling.readSmallFile("/proc/\(process)/task/\(thread)/cgroup") else { return nil }
            for line in text.split(separator: "\n") {
                let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
                guard parts.count == 3 else { continue }
                let matches = version == .v1 ? parts[1].split(separator: ",").contains("cpu") : (parts[0] == "0" && parts[1].isEmpty)
                if matches { return String(parts[2]) }
            }
            return nil
        }
    }

    /// The cgroups raised for one boost, leaf first: what `lower` gives back.
    public struct Lease: Sendable, Equatable {
        public var directories: [String]
    }

    /// Why a thread's cgroups were not raised (said once per cause by the caller).
    public enum Refusal: Error, Equatable, Sendable {
        /// Not alone in its cgroup, or in the hierarchy's root: nothing to raise.
        case shared
        /// A directory on the way is not root's, or a value cannot be read or written.
        case unusable(String)
        /// The guardian did not take the record.
        case unguarded
    }

    private struct Raised {
        var original: UInt64
        var raised: UInt64
        var count: Int
    }

    public let hierarchy: Hierarchy
    private let guardian: BoostGuardian?
    private let raised = Mutex([String: Raised]())
    /// The owner every directory on the way must have (root; tests run on a tree of their own).
    private let owner: uid_t

    /// `guardian`: told before each raise (nil only where no other process's thread is
    /// changed, as in tests). `owner`: whose directories are trusted (root).
    public init(hierarchy: Hierarchy, guardian: BoostGuardian?, owner: uid_t = 0) {
        self.hierarchy = hierarchy
        self.guardian = guardian
        self.owner = owner
    }

    /// The weight of a thread at `nice` in the hierarchy's unit (the kernel's
    /// `sched_prio_to_weight`; v2's `cpu.weight` is that over 1024 × 100).
    public static func weight(nice: Int8, version: Version) -> UInt64 {
        let table: [UInt64] = [88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916,
                               9548, 7620, 6100, 4904, 3906, 3121, 2501, 1991, 1586, 1277,
                               1024, 820, 655, 526, 423, 335, 272, 215, 172, 137,
                               110, 87, 70, 56, 45, 36, 29, 23, 18, 15]
        let w = table[Int(max(-20, min(19, nice))) + 20]
        return version == .v1 ? w : max(1, min(10000, (w * 100 + 512) / 1024))
    }

    /// The cgroup path (relative to the mount, starting with "/") of `thread` of `process`.
    func cgroupPath(thread: Int32, process: Int32) -> String? { hierarchy.cgroupPath(thread: thread, process: process) }

    /// The directories to raise for a thread in cgroup `path`: its own and every
    /// ancestor below the root, leaf first; checked to be root's directories.
    func chain(for path: String, thread: Int32) throws(Refusal) -> [String] {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
        guard path.hasPrefix("/"), !parts.isEmpty, parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }) else {
            throw .shared  // the root itself, or not a plain path
        }
        let leaf = hierarchy.mount + path
        // Alone in it: the member list is exactly this thread.
        guard let members = LinuxScheduling.readSmallFile(leaf + "/" + hierarchy.version.memberFile),
              members.split(separator: "\n").map({ Int32($0) }) == [thread] else { throw .shared }
        var out: [String] = []
        var dir = hierarchy.mount
        for p in parts {
            dir += "/" + p
            var st = stat()
            guard lstat(dir, &st) == 0, st.st_mode & S_IFMT == S_IFDIR, st.st_uid == owner else {
                throw .unusable("\(dir) is not a directory of \(owner == 0 ? "root" : "uid \(owner)")")
            }
            out.append(dir)
        }
        return out.reversed()
    }

    /// Raises the cgroups of `thread` (of `process`, started at `startTime`) to the
    /// weight of `nice`. Returns what to give back with `lower`.
    public func raise(thread: Int32, process: Int32, nice: Int8) throws(Refusal) -> Lease {
        guard let path = cgroupPath(thread: thread, process: process) else { throw .shared }
        return try raise(path: path, thread: thread, nice: nice)
    }

    /// Raises the cgroup at `path` (relative to the mount) of `thread`, and its ancestors.
    func raise(path: String, thread: Int32, nice: Int8) throws(Refusal) -> Lease {
        let dirs = try chain(for: path, thread: thread)
        let target = Self.weight(nice: nice, version: hierarchy.version)
        var done: [String] = []
        for dir in dirs {
            do throws(Refusal) { try raise(dir, to: target) } catch {
                lower(Lease(directories: done))
                throw error
            }
            done.append(dir)
        }
        return Lease(directories: done)
    }

    private func raise(_ dir: String, to target: UInt64) throws(Refusal) {
        try raised.withLock { r throws(Refusal) in
            if var e = r[dir] {
                e.count += 1
                r[dir] = e
                return
            }
            let file = dir + "/" + hierarchy.version.file
            guard let original = Self.read(file) else { throw .unusable("cannot read \(file)") }
            // Never lowered by a boost: a cgroup weighed above the boost's stays as it is.
            guard original < target else { r[dir] = Raised(original: original, raised: original, count: 1); return }
            if let guardian, !guardian.announceCgroup(file: file, original: original, raised: target) { throw .unguarded }
            guard Self.write(file, target) else {
                guardian?.forgetCgroup(file: file)
                throw .unusable("cannot write \(file)")
            }
            r[dir] = Raised(original: original, raised: target, count: 1)
        }
    }

    /// Gives back what `raise` took: a cgroup no boost needs any more gets its own
    /// weight again, unless someone else changed it meanwhile.
    public func lower(_ lease: Lease) {
        for dir in lease.directories {
            raised.withLock { r in
                guard var e = r[dir] else { return }
                e.count -= 1
                if e.count > 0 { r[dir] = e; return }
                r[dir] = nil
                guard e.raised != e.original else { return }
                let file = dir + "/" + hierarchy.version.file
                if Self.read(file) == e.raised { _ = Self.write(file, e.original) }
                guardian?.forgetCgroup(file: file)
            }
        }
    }

    /// The cgroups raised now and their counts (for tests and stats).
    public var raisedNow: [String: Int] { raised.withLock { $0.mapValues(\.count) } }

    /// The number a cgroup value file holds (nil: unreadable, or not a number).
    public static func read(_ file: String) -> UInt64? {
        let fd = open(file, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 32)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return nil }
        let digits = buffer[..<n].prefix { $0 != UInt8(ascii: "\n") }
        return UInt64(String(decoding: digits, as: UTF8.self))
    }

    /// Writes `value` into a cgroup value file; whether it was taken.
    @discardableResult
    public static func write(_ file: String, _ value: UInt64) -> Bool {
        let fd = open(file, O_WRONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let text = Array("\(value)\n".utf8)
        return text.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == text.count
    }
}
