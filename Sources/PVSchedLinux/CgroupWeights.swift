import CLinuxSched
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
/// changes nothing the scheduler compares. So while such a thread is boosted, its
/// cgroup and every ancestor below the hierarchy's root weigh as a thread at the
/// boost's nice (nice -20: shares 88761, weight 8668). Raises are counted per cgroup
/// (a VM's cgroup stays raised while any of its vCPUs is boosted), and a cgroup gets
/// its own value back when the last one under it ends. Group scheduling splits a
/// cgroup's weight over the CPUs by its children's load, so a raise reaches the
/// boosted vCPU's CPU and little else.
///
/// Repayments (nice 19) are not carried to the cgroups: lowering the thread's own
/// cgroup does not reach the host (the cgroups above keep their weight; measured with
/// scripts/boost-classes.sh), and lowering the ones above lowers the VM's other
/// threads too (its other vCPUs, the emulator's) while it lasts.
///
/// Only a thread alone in its cgroup is served (raising a shared cgroup would boost
/// every thread in it), and only through directories owned by root (a cgroup
/// delegated to a user is that user's to weigh); both are checked again at least
/// every second of a thread's boosts (`recheckNs`). A value someone else changed while
/// pvsched held it is left as they set it, and not written again until every raise
/// on it ended. Each value is told to the `BoostGuardian` before it is written, which
/// puts the cgroup's own value back if the daemon dies; without a guardian taking the
/// record, nothing is written.
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

    /// The cgroups raised for one boost, leaf first, and the weight: what `release` gives back.
    public struct Lease: Sendable, Equatable {
        public var directories: [String]
        public var weight: UInt64
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

    /// What pvsched holds of one cgroup's value.
    private struct Held {
        var original: UInt64
        /// What pvsched wrote last (the original while it wrote nothing).
        var written: UInt64
        /// The weights the boosts under it ask for.
        var raises: [UInt64] = []
        /// Someone else changed the value meanwhile: pvsched writes it no more.
        var overridden = false
        /// The value the raises call for: the highest, never below the cgroup's own.
        var wanted: UInt64 { max(raises.max() ?? original, original) }
    }

    public let hierarchy: Hierarchy
    private let guardian: BoostGuardian?
    private let held = Mutex([String: Held]())
    /// The value files, kept open (a boost reads and writes each cgroup of its chain).
    private let files = CgroupValueFiles()
    /// Files whose guardian record is kept while no lease holds them (`resting`).
    private let atRest = Mutex(Set<String>())
    /// The owner every directory on the way must have (root; tests run on a tree of their own).
    private let owner: uid_t
    /// Chains checked lately (cgroup path → its thread, directories, when): a boost of
    /// the same thread in the same cgroup within `recheckNs` skips the member list and
    /// the owners (three reads and stats, ~13 µs a boost here). The thread's cgroup is
    /// read at every boost, so a thread that moved is checked at once; only root can
    /// add a thread to a root's cgroup, and such a change is seen within `recheckNs`.
    private let checked = Mutex([String: (thread: Int32, directories: [String], atNs: UInt64)]())
    /// How long a checked chain is trusted.
    let recheckNs: UInt64

    /// `guardian`: told before each value is written (nil only where no other process's thread is
    /// changed, as in tests). `owner`: whose directories are trusted (root).
    public init(hierarchy: Hierarchy, guardian: BoostGuardian?, owner: uid_t = 0, recheckNs: UInt64 = 1_000_000_000) {
        self.hierarchy = hierarchy
        self.guardian = guardian
        self.owner = owner
        self.recheckNs = recheckNs
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

    /// The directories to weigh for a thread in cgroup `path`: its own and every
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

    /// Raises the cgroups of `thread` (of `process`) to the weight of a thread at
    /// `nice` (a boost's, negative). Returns what to give back with `release`.
    public func raise(thread: Int32, process: Int32, nice: Int8) throws(Refusal) -> Lease {
        guard let path = cgroupPath(thread: thread, process: process) else { throw .shared }
        return try raise(path: path, thread: thread, nice: nice)
    }

    /// Raises the cgroup at `path` (relative to the mount) of `thread`, and its ancestors.
    func raise(path: String, thread: Int32, nice: Int8) throws(Refusal) -> Lease {
        let now = MonotonicClock.nowNs()
        let dirs: [String]
        if let c = checked.withLock({ $0[path] }), c.thread == thread, now &- c.atNs < recheckNs {
            dirs = c.directories
        } else {
            do throws(Refusal) { dirs = try chain(for: path, thread: thread) } catch {
                checked.withLock { _ = $0.removeValue(forKey: path) }
                throw error
            }
            checked.withLock { c in
                if c.count >= 1024 { c = c.filter { now &- $0.value.atNs < recheckNs } }
                c[path] = (thread, dirs, now)
            }
        }
        let lease = Lease(directories: dirs, weight: Self.weight(nice: nice, version: hierarchy.version))
        var done: [String] = []
        for dir in dirs {
            do throws(Refusal) { try take(dir, lease) } catch {
                release(Lease(directories: done, weight: lease.weight))
                throw error
            }
            done.append(dir)
        }
        return lease
    }

    private func take(_ dir: String, _ lease: Lease) throws(Refusal) {
        let file = dir + "/" + hierarchy.version.file
        try held.withLock { h throws(Refusal) in
            var e: Held
            // The value just read is what the cgroup holds: nobody changed it since.
            var current: UInt64?
            if let old = h[dir] { e = old } else {
                guard let original = files.read(file) else { throw .unusable("cannot read \(file)") }
                e = Held(original: original, written: original)
                current = original
            }
            e.raises.append(lease.weight)
            if !e.overridden, e.wanted != e.written {
                if let guardian, !guardian.announceCgroup(file: file, original: e.original, written: e.wanted) {
                    // Not written: the guardian keeps (or drops) what is in force.
                    if h[dir] == nil { guardian.forgetCgroup(file: file) } else {
                        _ = guardian.announceCgroup(file: file, original: e.original, written: e.written)
                    }
                    throw .unguarded
                }
                if (current ?? files.read(file)) != e.written {
                    e.overridden = true  // an administrator's value: theirs from now on
                    guardian?.forgetCgroup(file: file)
                } else if files.write(file, e.wanted) {
                    e.written = e.wanted
                } else if h[dir] == nil {
                    guardian?.forgetCgroup(file: file)
                    throw .unusable("cannot write \(file)")
                }
            }
            h[dir] = e
        }
    }

    /// Gives back what `raise` took: each cgroup gets the value its remaining raises
    /// call for, its own once none is left, unless someone else changed it meanwhile.
    public func release(_ lease: Lease) {
        for dir in lease.directories {
            let file = dir + "/" + hierarchy.version.file
            held.withLock { h in
                guard var e = h[dir] else { return }
                guard let i = e.raises.firstIndex(of: lease.weight) else { return }
                e.raises.remove(at: i)
                let done = e.raises.isEmpty
                var present = false  // the cgroup answered a write: it is still there
                if !e.overridden, e.wanted != e.written {
                    if files.read(file) != e.written {
                        e.overridden = true
                    } else if done || guardian?.announceCgroup(file: file, original: e.original, written: e.wanted) ?? true {
                        if files.write(file, e.wanted) { e.written = e.wanted; present = true }
                    }
                }
                if done {
                    // The guardian keeps its record while the cgroup exists (it restores only a
                    // value pvsched writes, and this one is the cgroup's own again): the next
                    // boost then costs it nothing. A cgroup that went (its VM stopped) is forgotten.
                    h[dir] = nil
                    if e.overridden || (!present && access(dir, F_OK) != 0) {
                        guardian?.forgetCgroup(file: file)
                        files.close(file)
                    } else {
                        resting(file)
                    }
                } else {
                    h[dir] = e
                }
            }
        }
    }

    /// Notes a file whose guardian record is kept at rest; past 256 of them, those of
    /// cgroups that are gone are forgotten. Under `held`.
    private func resting(_ file: String) {
        atRest.withLock { r in
            r.insert(file)
            guard r.count > 256 else { return }
            for f in r where access(f, F_OK) != 0 {
                r.remove(f)
                guardian?.forgetCgroup(file: f)
                files.close(f)
            }
        }
    }

    /// The cgroups raised now and how many boosts hold each (for tests and stats).
    public var raisedNow: [String: Int] { held.withLock { $0.mapValues(\.raises.count) } }

    /// The number a cgroup value file holds (nil: unreadable, or not a number).
    public static func read(_ file: String) -> UInt64? {
        let fd = open(file, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        guard case .done(let value) = CgroupValueFiles.readValue(fd) else { return nil }
        return value
    }

    /// Writes `value` into a cgroup value file; whether it was taken.
    @discardableResult
    public static func write(_ file: String, _ value: UInt64) -> Bool {
        let fd = open(file, O_WRONLY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard case .done = CgroupValueFiles.writeValue(value, fd) else { return false }
        return true
    }
}

/// Cgroup value files kept open and read and written in place (`pread`/`pwrite`).
/// Here opening a cgroup file costs ~5 µs and reading or writing an open one ~0.4 µs
/// (measured with a C loop over `cpu.shares`); a boost and its end read and write each
/// cgroup of the thread's chain, on the daemon's real-time threads. Only files of a
/// cgroup file system are kept: a cgroup that is removed answers ENODEV on its old
/// file, which is then closed and the path opened again once (a cgroup made again
/// under the same name). Any other file (a test's tree) is opened for each use. At
/// most `limit` are kept; past that, every one is closed and the cache starts over.
final class CgroupValueFiles: Sendable {
    private let open = Mutex([String: Int32]())
    let limit: Int

    init(limit: Int = 256) { self.limit = limit }

    deinit { open.withLock { for fd in $0.values { Glibc.close(fd) } } }

    /// The number `file` holds (nil: unreadable, or not a number).
    func read(_ file: String) -> UInt64? { use(file, Self.readValue) ?? nil }

    /// Writes `value` into `file`; whether it was taken.
    func write(_ file: String, _ value: UInt64) -> Bool { use(file) { Self.writeValue(value, $0) } != nil }

    /// What a read or write of an open value file gave, or the errno it failed with (0: nothing read).
    enum Outcome<T> { case done(T), failed(Int32) }

    /// The number an open value file holds, read from its start (a value not a number: `.done(nil)`).
    static func readValue(_ fd: Int32) -> Outcome<UInt64?> {
        var buffer = [UInt8](repeating: 0, count: 32)
        let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard n > 0 else { return .failed(n < 0 ? errno : 0) }
        let digits = buffer[..<n].prefix { $0 != UInt8(ascii: "\n") }
        return .done(UInt64(String(decoding: digits, as: UTF8.self)))
    }

    /// Writes `value` at an open value file's start.
    static func writeValue(_ value: UInt64, _ fd: Int32) -> Outcome<Void> {
        let text = Array("\(value)\n".utf8)
        let n = text.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        return n == text.count ? .done(()) : .failed(n < 0 ? errno : 0)
    }

    /// Closes `file` if it is kept open (its cgroup went, or pvsched is done with it).
    func close(_ file: String) {
        if let fd = open.withLock({ $0.removeValue(forKey: file) }) { Glibc.close(fd) }
    }

    /// How many files are kept open (for tests).
    var count: Int { open.withLock { $0.count } }

    /// Runs `body` on an open descriptor of `file`: the kept one, else one opened now
    /// (kept when it is a cgroup file). Under the lock, so no descriptor is closed while
    /// another thread uses it. A kept one that answers ENODEV is replaced once.
    private func use<T>(_ file: String, _ body: (Int32) -> Outcome<T>) -> T? {
        open.withLock { kept -> T? in
            if let fd = kept[file] {
                switch body(fd) {
                case .done(let v): return v
                case .failed(let e):
                    guard e == ENODEV else { return nil }
                    kept[file] = nil
                    Glibc.close(fd)
                }
            }
            // Read-only where the file or its mount is (a container's): read, never kept.
            var fd = Glibc.open(file, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
            var writable = true
            if fd < 0, errno == EACCES || errno == EROFS || errno == EPERM {
                fd = Glibc.open(file, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
                writable = false
            }
            guard fd >= 0 else { return nil }
            let result = body(fd)
            if writable, Self.onCgroupFileSystem(fd) {
                if kept.count >= limit {
                    for other in kept.values { Glibc.close(other) }
                    kept.removeAll()
                }
                kept[file] = fd
            } else {
                Glibc.close(fd)
            }
            if case .done(let v) = result { return v }
            return nil
        }
    }

    /// Whether `fd` is a file of a cgroup file system (v1's or v2's).
    static func onCgroupFileSystem(_ fd: Int32) -> Bool { pvs_fd_on_cgroupfs(fd) == 1 }
}
