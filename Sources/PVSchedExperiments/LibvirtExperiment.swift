import Foundation
import Histogram
import PVSchedAttach
import PVSchedControl
import PVSchedCore
import PVSchedLinux
import PVSchedTesting
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Why a libvirt experiment cannot run.
public struct LibvirtExperimentError: Error, CustomStringConvertible {
    public var description: String
    init(_ d: String) { description = d }
}

/// A guest that stopped making progress: QEMU's multi-threaded TCG, not the scheduling.
struct LibvirtGuestWedged: Error, CustomStringConvertible {
    var description: String
}

/// libvirt's own real-time setting for a domain's vCPUs and emulator threads: what
/// an operator picks today (`<cputune><vcpusched …/><emulatorsched …/>`).
enum LibvirtStaticRT {
    static func cputune(vcpus: Int) -> String {
        "<vcpusched vcpus='0-\(vcpus - 1)' scheduler='fifo' priority='1'/><emulatorsched scheduler='fifo' priority='2'/>"
    }

    /// Set once libvirt was seen failing to apply it here (cgroups without real-time runtime).
    static let refusedHere = Atomic<Bool>(false)

    /// What the demo does where libvirt cannot apply its setting: the domain started
    /// paused; its cgroups given real-time runtime, parents first (machine's and the
    /// domain's 95% of each second, each vCPU's cgroup 80%/N and the emulator's 14% of
    /// every 10 ms: the most the kernel's rule, children's sum ≤ parent's, allows); the
    /// threads set as libvirt would (vCPUs FIFO 1, the others FIFO 2); then resumed.
    /// `undo` is set, before anything is written, to what to put back once the domain is
    /// gone: the machine cgroup's runtime.
    static func grantAndSet(_ guest: LibvirtLinuxGuest, undo: inout (file: String, original: UInt64)?) throws {
        guard let h = CgroupWeights.Hierarchy.detect(), h.version == .v1 else {
            throw LibvirtExperimentError("libvirt cannot apply its real-time setting here, and this host has no cgroup v1 cpu hierarchy to give runtime in")
        }
        let pid = guest.pid
        let (vcpus, others) = guest.threads
        guard pid > 0, !vcpus.isEmpty, let vcpuPath = h.cgroupPath(thread: vcpus[0], process: pid) else {
            throw LibvirtExperimentError("static-rt: cannot find the domain's vCPU threads and cgroups")
        }
        let vcpuDirs = vcpus.compactMap { h.cgroupPath(thread: $0, process: pid) }.map { h.mount + $0 }
        let emulatorDirs = Set(others.compactMap { h.cgroupPath(thread: $0, process: pid) }.map { h.mount + $0 })
        let domain = h.mount + String(vcpuPath[..<vcpuPath.lastIndex(of: "/")!])
        let machine = String(domain[..<domain.lastIndex(of: "/")!])
        if machine.count > h.mount.count, let old = CgroupWeights.read(machine + "/cpu.rt_runtime_us") {
            undo = (machine + "/cpu.rt_runtime_us", old)
        }
        func set(_ dir: String, period: UInt64, runtime: UInt64) throws {
            guard CgroupWeights.write(dir + "/cpu.rt_period_us", period), CgroupWeights.write(dir + "/cpu.rt_runtime_us", runtime) else {
                throw LibvirtExperimentError("static-rt: cannot give \(dir) real-time runtime \(runtime) µs per \(period) µs (errno \(errno))")
            }
        }
        if machine.count > h.mount.count { try set(machine, period: 1_000_000, runtime: 950_000) }
        try set(domain, period: 1_000_000, runtime: 950_000)
        for d in vcpuDirs { try set(d, period: 10_000, runtime: 8_000 / UInt64(vcpuDirs.count)) }
        for d in emulatorDirs where d != domain { try set(d, period: 10_000, runtime: 1_400) }
        for t in vcpus { try LinuxScheduling.setThread(t, .fifo(priority: 1)) }
        for t in others { try? LinuxScheduling.setThread(t, .fifo(priority: 2)) }
        try guest.resume()
    }

    /// Puts the machine cgroup's runtime back once the domain's cgroups are gone (the
    /// kernel refuses a parent less than its children have), waiting up to 10 s for that.
    static func putBack(_ u: (file: String, original: UInt64)) {
        let deadline = MonotonicClock.nowNs() + 10_000_000_000
        while !CgroupWeights.write(u.file, u.original) && MonotonicClock.nowNs() < deadline { usleep(100_000) }
    }
}

extension ExperimentRunner {
    /// One mode with the Linux guest as a libvirt domain (transient, `virsh create`),
    /// as operators run VMs: libvirt starts QEMU (TCG), pins the vCPUs (`<vcpupin>`),
    /// puts its threads in its cgroups and makes the pvsched region. static-rt is
    /// libvirt's own `<vcpusched>`; the pvsched modes are served by a real daemon
    /// following libvirt (`libvirt = on`), the driver and class from the domain's
    /// pvsched metadata. The same host contention and probes as the other VMMs.
    ///
    /// A guest that wedges (QEMU's multi-threaded TCG: its vCPUs spin with interrupts
    /// off and its output stops, seen now and then under libvirt), or ends without a
    /// readable result, is run again, at most twice, and the result says so.
    func runLibvirt(_ mode: Mode, index: Int, image: LinuxGuestImage) throws -> ModeResult {
        var wedged = 0
        while true {
            do {
                var r = try runLibvirtOnce(mode, index: index, image: image)
                if wedged > 0 { r.outcome += "; run again after \(wedged) wedged guest\(wedged > 1 ? "s" : "")" }
                return r
            } catch let e as LibvirtGuestWedged where wedged < 2 {
                wedged += 1
                FileHandle.standardError.write(Data("\r\(mode): \(e.description); running it again\n".utf8))
            }
        }
    }

    private func runLibvirtOnce(_ mode: Mode, index: Int, image: LinuxGuestImage) throws -> ModeResult {
        if case .kernel = mode { throw LinuxGuestError("kernel:DRIVER modes need KVM exits; QEMU runs under TCG here") }
        let managed: (driver: String, boost: BoostSettings, governor: GovernorConfig)? = mode == .staticRT ? nil : mode.pvsched(in: scenario)
        let contended = mode != .idle
        let (options, seconds) = cyclictestGuest(served: managed != nil)

        // The pvsched modes: a daemon following libvirt, with the scenario's governor and protection.
        var daemon: DaemonProcess?
        var metadata: [String: String]?
        if let managed {
            let g = managed.governor
            let config = """
            libvirt = on
            protect-host-priority = \(managed.boost.protectedHostPriority.map { Int($0) } ?? 0)
            critical-budget-us = \(g.criticalBudgetNs / 1000)
            general-budget-us = \(g.generalBudgetNs / 1000)
            throttle-us = \(g.throttleWindowNs / 1000)
            vm-share = \(g.maxVMShare)
            repayment-factor = \(g.repaymentFactor)

            """
            daemon = try DaemonProcess(config: config + scenario.daemonConfig + "\n")
            metadata = ["driver": managed.driver, "boost": BoostSettings.classText(managed.boost.boosted)]
        }
        defer { daemon?.stop() }

        var guest: LibvirtLinuxGuest?
        var runtimeUndo: (file: String, original: UInt64)?
        var outcome = managed == nil ? "libvirt, no pvsched" : "libvirt, served by the daemon"
        if mode == .staticRT {
            if !LibvirtStaticRT.refusedHere.load(ordering: .relaxed) {
                do {
                    guest = try LibvirtLinuxGuest(image: image, options: options, cpus: scenario.cpus,
                                                  cputune: LibvirtStaticRT.cputune(vcpus: scenario.vcpus))
                    outcome = "libvirt <vcpusched> fifo"
                } catch let e as LinuxGuestError where "\(e)".contains("scheduler") || "\(e)".contains("not permitted") {
                    LibvirtStaticRT.refusedHere.store(true, ordering: .relaxed)
                    let lines = "\(e)".split(separator: "\n")
                    let why = lines.first { $0.contains("scheduler") || $0.contains("not permitted") } ?? lines.first ?? ""
                    FileHandle.standardError.write(Data("""
                    \rstatic-rt: libvirt cannot apply <vcpusched> here (\(why)): its vCPU cgroups \
                    have no real-time runtime. The demo gives them runtime (machine and domain 95% of each second, the vCPUs \
                    80% and the emulator 14% of every 10 ms) and sets libvirt's priorities itself (vCPUs FIFO 1, emulator FIFO 2).

                    """.utf8))
                }
            }
            if guest == nil {
                let g = try LibvirtLinuxGuest(image: image, options: options, cpus: scenario.cpus, paused: true)
                guest = g
                do { try LibvirtStaticRT.grantAndSet(g, undo: &runtimeUndo) } catch {
                    g.destroy()
                    if let u = runtimeUndo { LibvirtStaticRT.putBack(u) }
                    throw error
                }
                outcome = "libvirt <vcpusched> fifo, runtime granted by the demo"
            }
        } else {
            guest = try LibvirtLinuxGuest(image: image, options: options, cpus: scenario.cpus, metadata: metadata)
        }
        guard let guest else { throw LinuxGuestError("no domain") }
        defer {
            guest.destroy()
            if let u = runtimeUndo { LibvirtStaticRT.putBack(u) }
        }

        let bootLimit = MonotonicClock.nowNs() + 120_000_000_000
        while !guest.console.contains("PVS-READY") {
            guard guest.isRunning, MonotonicClock.nowNs() < bootLimit else {
                throw LinuxGuestError("the Linux guest did not get ready under libvirt (mode \(mode)): \(guest.console.suffix(400))"
                    + (daemon.map { "\ndaemon: \($0.stopAndReadLog().suffix(1500))" } ?? ""))
            }
            progress?(mode, index, 0)
            usleep(200_000)
        }
        if let daemon, (try? daemon.vm(guest.name))??.negotiation.hasPrefix("accepted") != true {
            outcome = "not served: \((try? daemon.vm(guest.name))??.negotiation ?? "not attached")"
        }
        let (load, probes) = try hostLoadAndProbes(contended: contended)
        let runStart = MonotonicClock.nowNs()
        let limit = runStart + UInt64(seconds + 120) * 1_000_000_000
        // The daemon's counters, read while the domain runs (it is detached, and they
        // are gone, as soon as the guest powers off after its output).
        var stats: VMStatistics?
        var fallback: String?
        var lastRead: UInt64 = 0
        // Output that stops growing for 30 s after the run: a wedged guest.
        var lastLength = 0, lastGrowth = MonotonicClock.nowNs()
        while !guest.console.contains("PVS-END cyclictest") && guest.isRunning && MonotonicClock.nowNs() < limit {
            let length = guest.console.utf8.count
            if length != lastLength { lastLength = length; lastGrowth = MonotonicClock.nowNs() }
            if MonotonicClock.nowNs() > runStart + UInt64(seconds) * 1_000_000_000, MonotonicClock.nowNs() &- lastGrowth > 30_000_000_000 { break }
            progress?(mode, index, Double(MonotonicClock.nowNs() - runStart) / 1e9)
            if let daemon, MonotonicClock.nowNs() &- lastRead > 1_000_000_000 {
                lastRead = MonotonicClock.nowNs()
                if let s = (try? daemon.client().call(VMStats.self, VMStats.Params(vm: guest.name)))?.vms.first { stats = s }
                if fallback == nil { fallback = (try? daemon.vm(guest.name))??.vcpus.compactMap(\.boostClassFallback).first }
            }
            usleep(100_000)
        }
        if let daemon, let s = (try? daemon.client().call(VMStats.self, VMStats.Params(vm: guest.name)))?.vms.first { stats = s }
        let host = finish(load, probes)
        var totals = ServedTotals()
        for v in stats?.vcpus ?? [] {
            totals.boosts += v.boosts; totals.boostedNs += v.boostedNs; totals.repayments += v.repayments
            totals.repaymentNs += v.repaymentNs; totals.throttles += v.throttles
        }
        if let why = fallback {
            outcome += "; " + (why.split(separator: ":").last.map { $0.trimmingCharacters(in: .whitespaces) } ?? why)
        }
        guard let out = guest.section("cyclictest") else {
            if guest.isRunning {
                throw LibvirtGuestWedged(description: "the guest stopped printing its result (no output for 30 s)")
            }
            // Finished without a readable result (seen once: 40 s for a 10 s run, the
            // section's start lost): its console is kept to be read, and the run made again.
            let kept = NSTemporaryDirectory() + "pvsched-demo-\(guest.name).console"
            try? FileManager.default.removeItem(atPath: kept)
            try? FileManager.default.copyItem(atPath: guest.consolePath, toPath: kept)
            throw LibvirtGuestWedged(description: "no cyclictest result from the guest (its console is kept at \(kept))")
        }
        return try ModeResult(linuxGuest: mode, cyclictest: out, host: host, totals: totals, outcome: outcome)
    }
}

/// What `pvsched demo --vmm libvirt` runs against: this host's libvirtd (or one
/// started for the demo where no service manager runs it, stopped at the end).
public final class LibvirtForDemo {
    private let service: LibvirtService

    /// Refuses while a pvsched service answers on the default socket: it would serve
    /// the demo's domains too, and the baselines would not be baselines.
    public init() throws {
        if let c = try? ControlClient(path: ControlProtocol.defaultSocketPath), (try? c.call(DaemonInfo.self)) != nil {
            throw LibvirtExperimentError("a pvsched daemon answers on \(ControlProtocol.defaultSocketPath): it would serve the demo's libvirt domains too (stop it first: systemctl stop pvsched)")
        }
        service = try LibvirtService()
    }

    /// Stops what was started for the demo.
    public func stop() { service.stop() }
}
