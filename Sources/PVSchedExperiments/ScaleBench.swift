import Foundation
import PVSchedControl
import PVSchedTesting

/// The daemon's cost on a host full of VMs (`pvsched bench --only scale`): 1 to 64
/// attached VMs of 4 vCPUs, served by a real `pvsched daemon` through its control
/// API. The VMs are stand-in guests (`pvsched-standin`: one thread per vCPU and a
/// pvsched region in /dev/shm written the way the Linux module writes it); a busy VM
/// runs a cyclictest-like real-time wake-up every 1 ms on its vCPU 0, its other
/// vCPUs idle; an idle VM's vCPUs wake only now and then (`idleWakeupUs`).
///
/// Each row is measured on a fresh daemon in two windows: every VM idle (the
/// daemon's CPU per idle VM), then a quarter of the VMs busy (the rest of the
/// daemon's CPU, per busy VM; the guest-change-to-boost latency the stand-ins saw;
/// the real-time wake-ups of the daemon's threads).
public enum ScaleBench {
    /// One measured row.
    public struct Row: Codable, Sendable {
        public var vms: Int
        public var vcpus: Int
        public var busyVMs: Int
        /// The daemon's CPU (percent of one core) per VM in the busy window.
        public var daemonCpuPerVMPercent: Double
        public var daemonCpuPerBusyVMPercent: Double
        public var daemonCpuPerIdleVMPercent: Double
        public var eventToBoostP50Us: Double
        public var eventToBoostP99Us: Double
        public var eventToBoostMaxUs: Double
        /// Busy wake-ups whose work ended without a boost seen, and all busy wake-ups.
        public var wakeupsWithoutBoost: UInt64
        public var wakeups: UInt64
        /// Wake-ups per second of the daemon's real-time threads (each preempts the host's work).
        public var rtWakeupsPerSecond: Double
        public var daemonRssMiB: Double
        /// Over the whole row (both windows): halts a boost was held through (the guest's
        /// next deadline near), and vCPU wake-ups the kernel settled without waking the
        /// daemon (their CPU was idle).
        public var heldHalts: UInt64
        public var uncontendedWakeups: UInt64
        /// The daemon's threads (and its guardian's, as `guardian`) by CPU in the busy
        /// and in the idle window (name: percent of a core).
        public var threads: [String: Double]
        public var idleThreads: [String: Double]
    }

    /// How the benchmark runs.
    public struct Settings: Sendable {
        public var vmCounts = [1, 4, 16, 64]
        public var vcpus = 4
        public var windowSeconds = 5.0
        public var idleWakeupUs: UInt64 = 50_000
        /// The events the daemon takes (`both`: the kernel's and the watcher's).
        public var events = "both"
        /// The daemon's `hold-through-halts-us` (0: off, its default).
        public var holdThroughHaltsUs: UInt64 = 0
        public init() {}
    }

    public static func run(_ settings: Settings = Settings(), progress: ((String) -> Void)? = nil) throws -> [Row] {
        try settings.vmCounts.map { n in
            progress?("\(n) VM\(n == 1 ? "" : "s") of \(settings.vcpus) vCPUs")
            return try row(vms: n, settings: settings)
        }
    }

    static func row(vms n: Int, settings: Settings) throws -> Row {
        let daemon = try DaemonProcess(config: "hold-through-halts-us = \(settings.holdThroughHaltsUs)\n")
        let client = try daemon.client()
        var guests: [StandInProcess] = []
        defer {
            for (i, _) in guests.enumerated() { _ = try? client.call(VMStop.self, VMReference("scale\(i)")) }
            for g in guests { g.stop() }
        }
        for i in 0..<n {
            let g = try StandInProcess(vcpus: settings.vcpus, region: "/dev/shm/pvsched-scale-\(getpid())-\(i)",
                                       arguments: ["--idle-wakeup-us", "\(settings.idleWakeupUs)"])
            guests.append(g)
            var p = VMAttach.Params()
            p.name = "scale\(i)"
            p.pid = g.pid
            p.threads = g.threads
            p.shm = g.region
            p.events = settings.events
            _ = try client.call(VMAttach.self, p)
        }
        usleep(1_000_000)  // the attaches settle (registrations, first looks)
        let idle = try window(daemon.pid, seconds: settings.windowSeconds)
        let busyCount = max(1, n / 4)
        for g in guests.prefix(busyCount) {
            try g.command("busy 0 on")
            _ = try g.command("samples")
        }
        usleep(500_000)
        for g in guests.prefix(busyCount) { _ = try g.command("samples") }  // the start-up is not measured
        let busy = try window(daemon.pid, seconds: settings.windowSeconds)
        var latencies: [UInt64] = []
        var missed: UInt64 = 0
        for g in guests.prefix(busyCount) {
            let words = try g.command("samples", timeout: 20).split(separator: " ")
            guard words.first == "samples", words.count >= 2 else { throw StandInError("the stand-in did not give its samples") }
            missed += UInt64(words[1]) ?? 0
            latencies += words.dropFirst(2).compactMap { UInt64($0) }
        }
        let all = try client.call(VMStats.self, VMStats.Params()).vms.flatMap(\.vcpus)
        let perIdle = idle.cpuPercent / Double(n)
        let perBusy = (busy.cpuPercent - perIdle * Double(n - busyCount)) / Double(busyCount)
        return Row(vms: n, vcpus: settings.vcpus, busyVMs: busyCount, daemonCpuPerVMPercent: busy.cpuPercent / Double(n),
                   daemonCpuPerBusyVMPercent: max(0, perBusy), daemonCpuPerIdleVMPercent: perIdle,
                   eventToBoostP50Us: Sample.percentile(latencies, 0.5) / 1000, eventToBoostP99Us: Sample.percentile(latencies, 0.99) / 1000,
                   eventToBoostMaxUs: Double(latencies.max() ?? 0) / 1000, wakeupsWithoutBoost: missed,
                   wakeups: UInt64(latencies.count) + missed, rtWakeupsPerSecond: busy.rtWakeupsPerSecond,
                   daemonRssMiB: ProcessSample.rssMiB(daemon.pid), heldHalts: all.reduce(0) { $0 &+ $1.holds },
                   uncontendedWakeups: all.reduce(0) { $0 &+ ($1.uncontendedWakeups ?? 0) }, threads: busy.threads, idleThreads: idle.threads)
    }

    /// What the daemon used in one window.
    struct Window {
        var cpuPercent: Double
        var rtWakeupsPerSecond: Double
        var threads: [String: Double]
    }

    static func window(_ pid: Int32, seconds: Double) throws -> Window {
        let a = ProcessSample.threadsWithChildren(of: pid)
        let t0 = Date()
        usleep(UInt32(seconds * 1_000_000))
        let b = ProcessSample.threadsWithChildren(of: pid)
        let elapsed = Date().timeIntervalSince(t0)
        var cpu = 0.0, rtSwitches = 0.0
        var byName: [String: Double] = [:]
        for (tid, end) in b {
            let start = a[tid]
            let ns = Double(end.cpuNs &- (start?.cpuNs ?? 0))
            cpu += ns
            byName[end.name, default: 0] += ns / elapsed / 1e7
            if end.realTime { rtSwitches += Double(end.voluntarySwitches &- (start?.voluntarySwitches ?? 0)) }
        }
        return Window(cpuPercent: cpu / elapsed / 1e7, rtWakeupsPerSecond: rtSwitches / elapsed, threads: byName)
    }

    /// The rows as a table.
    public static func table(_ rows: [Row], settings: Settings) -> String {
        var out = "daemon cost by VM count (\(settings.vcpus) vCPUs per VM; a busy VM: RT wake-up every 1 ms on vCPU 0; "
            + "idle vCPUs wake every \(settings.idleWakeupUs / 1000) ms; events: \(settings.events); "
            + "holds through halts: \(settings.holdThroughHaltsUs == 0 ? "off" : "\(settings.holdThroughHaltsUs) µs"); \(Int(settings.windowSeconds)) s windows)\n"
        let header = ["VMs", "vCPUs", "busy", "CPU/busy VM", "CPU/idle VM", "change→boost p50", "p99", "max", "no boost", "RT wake-ups/s",
                      "held halts", "settled in kernel", "RSS"]
        let cells = rows.map { r in
            [String(r.vms), String(r.vms * r.vcpus), String(r.busyVMs),
             String(format: "%.3f%%", r.daemonCpuPerBusyVMPercent), String(format: "%.4f%%", r.daemonCpuPerIdleVMPercent),
             String(format: "%.0f µs", r.eventToBoostP50Us), String(format: "%.0f µs", r.eventToBoostP99Us),
             String(format: "%.0f µs", r.eventToBoostMaxUs), "\(r.wakeupsWithoutBoost)/\(r.wakeups)",
             String(format: "%.0f", r.rtWakeupsPerSecond), "\(r.heldHalts)", "\(r.uncontendedWakeups)",
             String(format: "%.1f MiB", r.daemonRssMiB)]
        }
        let widths = header.indices.map { i in ([header[i]] + cells.map { $0[i] }).map(\.count).max() ?? 0 }
        func line(_ c: [String]) -> String {
            c.enumerated().map { i, s in s.padding(toLength: widths[i], withPad: " ", startingAt: 0) }.joined(separator: "  ")
        }
        out += line(header) + "\n" + cells.map(line).joined(separator: "\n")
        if let last = rows.last {
            let top = last.threads.sorted { $0.value > $1.value }.prefix(5).map { String(format: "%@ %.2f%%", $0.key, $0.value) }
            out += "\ndaemon threads at \(last.vms) VMs (busy window, % of a core): " + top.joined(separator: ", ")
        }
        return out
    }
}

/// Per-thread CPU and switches of a process, from /proc.
enum ProcessSample {
    struct ThreadSample {
        var name: String
        var cpuNs: UInt64
        var voluntarySwitches: UInt64
        var realTime: Bool
    }

    /// The threads of `pid` and of its children (the guardian), the children's named `child:NAME`.
    static func threadsWithChildren(of pid: Int32) -> [Int32: ThreadSample] {
        var all = threads(of: pid)
        for child in children(of: pid) {
            for (tid, var t) in threads(of: child) {
                t.name = "child:" + t.name
                all[tid] = t
            }
        }
        return all
    }

    static func children(of pid: Int32) -> [Int32] {
        guard let tids = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task") else { return [] }
        return tids.flatMap { t in (read("/proc/\(pid)/task/\(t)/children") ?? "").split(separator: " ").compactMap { Int32($0) } }
    }

    static func threads(of pid: Int32) -> [Int32: ThreadSample] {
        var out: [Int32: ThreadSample] = [:]
        guard let tids = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task") else { return out }
        for t in tids {
            guard let tid = Int32(t) else { continue }
            let dir = "/proc/\(pid)/task/\(tid)"
            guard let schedstat = read(dir + "/schedstat"), let status = read(dir + "/status"), let stat = read(dir + "/stat") else { continue }
            let cpu = UInt64(schedstat.split(separator: " ").first ?? "") ?? 0
            let name = status.split(separator: "\n").first { $0.hasPrefix("Name:") }.map { $0.dropFirst(5).trimmingCharacters(in: .whitespaces) } ?? "?"
            let vol = status.split(separator: "\n").first { $0.hasPrefix("voluntary_ctxt_switches:") }
                .flatMap { UInt64($0.split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "") } ?? 0
            // Field 41 of stat (counted after the parenthesised name) is the policy.
            let afterName = stat.split(separator: ")").last.map { $0.split(separator: " ") } ?? []
            let policy = afterName.count > 38 ? Int(afterName[38]) ?? 0 : 0
            out[tid] = ThreadSample(name: name, cpuNs: cpu, voluntarySwitches: vol, realTime: policy == 1 || policy == 2)
        }
        return out
    }

    static func rssMiB(_ pid: Int32) -> Double {
        guard let status = read("/proc/\(pid)/status"),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
              let kb = Double(line.split(separator: " ").dropFirst().first ?? "") else { return 0 }
        return kb / 1024
    }

    private static func read(_ path: String) -> String? {
        guard let d = FileManager.default.contents(atPath: path) else { return nil }
        return String(decoding: d, as: UTF8.self)
    }
}
