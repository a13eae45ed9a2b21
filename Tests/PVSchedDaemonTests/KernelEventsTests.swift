import Foundation
import Synchronization
import PVSchedControl
import PVSchedCore
import PVSchedGuestImage
import PVSchedKernelEvents
import PVSchedLinux
import PVSchedTesting
import Testing

/// Reads a `pvsched run --export` file once it names every vCPU thread and the area.
func readExport(_ path: String) -> JSON? {
    guard let data = FileManager.default.contents(atPath: path), let doc = try? JSON.parse(Array(data)),
          let threads = doc["threads"]?.arrayValue, !threads.isEmpty, !threads.contains(.int(0)),
          doc["areaOffset"]?.intValue != nil else { return nil }
    return doc
}

/// A VM of the built-in VMM run by another process (`pvsched run --export`, a cyclic
/// workload every 5 ms), killed and its files removed when this object goes.
final class ExportedVM {
    let process = Process()
    let export: String
    init(binary: String, durationMs: Int) throws {
        export = "/tmp/pvsched-export-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).json"
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["run", "--export", export, "--workload", "cyclic", "--duration-ms", "\(durationMs)", "--interval-us", "5000",
                             "--timeout", "\(durationMs / 1000 + 20)"]
        process.standardOutput = FileHandle.nullDevice
        try process.run()
    }
    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        unlink(export)
        unlink("/dev/shm/pvsched-vm-\(process.processIdentifier).mem")  // SIGKILL left it
    }
}

/// The built-in VMM run as a separate process with no driver of its own
/// (`pvsched run --export`), driven by the daemon from KVM events the host
/// kernel reports through BPF.
@Suite(.serialized, .enabled(if: Requirement.root.shouldRun && Requirement.kvm.shouldRun && Requirement.bpf.shouldRun,
                             "needs root, /dev/kvm and the bpf syscall"))
struct KernelEventsTests {
    /// The VMM's counts, then the daemon's 300 ms later (so that records still in the
    /// ring buffer are counted; the same lag at both ends of a window cancels out).
    /// `injections` counts the wake-ups the kernel spared the daemon (the vCPU thread's
    /// CPU was idle) as well: each is an injection the VMM made.
    func counts(_ d: DaemonProcess, _ export: String) throws -> (vmmInjections: Int64, vmmExits: Int64, injections: Int64, exits: Int64) {
        let doc = try #require(readExport(export))
        usleep(300_000)
        let s = try d.client().call("vm.stats", ["vm": "ext"])
        let v = try #require(s["vms"]?.arrayValue?.first?["vcpus"]?.arrayValue?.first)
        return (doc["injections"]?.arrayValue?.first?.intValue ?? 0, doc["exits"]?.arrayValue?.first?.intValue ?? 0,
                (v["eventsByKind"]?["interrupt_injection"]?.intValue ?? 0) + (v["uncontendedWakeups"]?.intValue ?? 0),
                v["eventsByKind"]?["vm_exit"]?.intValue ?? 0)
    }

    @Test func anotherProcessesVMIsDrivenByKernelEvents() throws {
        try Requirement.root.check(); try Requirement.kvm.check(); try Requirement.bpf.check()
        let d = try DaemonProcess()
        // A 5 ms interval leaves the guest idle between its wake-ups (one costs 1-1.5 ms under
        // PVM): the kernel sees an injection as the halted vCPU thread's wake-up, so one raised
        // while the vCPU still runs is not seen, and at 2 ms a loaded machine lost 10-30% of them.
        let vmm = try ExportedVM(binary: d.binary, durationMs: 20_000)
        let export = vmm.export
        #expect(eventually(20) { readExport(export) != nil })
        let attach = try d.cli(["vm", "attach", "--export", export, "--name", "ext"])
        #expect(attach.status == 0, "\(attach.stderr)")
        #expect(attach.stdout.contains("area: accepted: pvsched-latency"))
        #expect(attach.stdout.contains("tp_btf/sched_waking: attached"))
        usleep(500_000)
        let a = try counts(d, export)
        usleep(3_000_000)
        let b = try counts(d, export)
        // The daemon's events match the VMM's own counters over the same window (the
        // VMM refreshes its counts every 100 ms, hence a tolerance of 10%).
        let vmmInjections = Double(b.vmmInjections - a.vmmInjections), injections = Double(b.injections - a.injections)
        let vmmExits = Double(b.vmmExits - a.vmmExits), exits = Double(b.exits - a.exits)
        #expect(vmmInjections > 100, "the VMM raised only \(vmmInjections) interrupts in 3 s: \(a) -> \(b)")
        #expect(abs(injections - vmmInjections) <= 0.1 * vmmInjections, "injections: daemon \(injections), VMM \(vmmInjections); \(a) -> \(b)")
        #expect(abs(exits - vmmExits) <= 0.1 * vmmExits, "exits: daemon \(exits), VMM \(vmmExits)")
        // Injections arrive before the vCPU runs: an injection, then the entry.
        let trace = try d.client().call("vm.trace", ["vm": "ext", "last": 200]).arrayValue ?? []
        let kinds = trace.compactMap { $0["event"]?.stringValue }
        let injectionThenEntry = zip(kinds, kinds.dropFirst()).contains { $0.hasPrefix("interruptInjection") && $1 == "vmEntry" }
        #expect(injectionThenEntry, "\(kinds.prefix(20))")
        let stats = try d.client().call("vm.stats", ["vm": "ext"])
        let outcomes = stats["vms"]?.arrayValue?.first?["vcpus"]?.arrayValue?.first?["outcomes"]
        #expect((outcomes?["boosted"]?.intValue ?? 0) > 0)
        #expect((outcomes?["unboosted"]?.intValue ?? 0) > 0)
        // Detaching undoes the boost of the other process's vCPU thread.
        let tid = Int32(readExport(export)?["threads"]?.arrayValue?.first?.intValue ?? 0)
        #expect(try d.cli(["vm", "stop", "ext"]).status == 0)
        #expect(!isRealTime(tid))
    }

    @Test func attachRefusesBadParameters() throws {
        try Requirement.root.check(); try Requirement.kvm.check()
        let d = try DaemonProcess()
        let c = try d.client()
        let me = Int64(getpid())
        for (params, field) in [
            (["pid": JSON.int(me), "threads": .array([.int(1)])] as [String: JSON], "params.threads"),
            (["pid": .int(999_999_999), "threads": .array([.int(1)])], "params.pid"),
            (["pid": .int(me), "threads": .array([])], "params.threads"),
            (["pid": .int(me), "threads": .array([.int(me)]), "memory": "/etc/passwd", "areaOffset": 0, "areaSize": 192], "params.memory"),
            (["pid": .int(me), "threads": .array([.int(me)]), "memory": "/dev/shm/../etc/passwd", "areaOffset": 0, "areaSize": 192], "params.memory"),
        ] {
            do { _ = try c.call("vm.attach", params); Issue.record("accepted \(params)") } catch let e as ControlError {
                #expect(e.field == field, "\(e)")
            }
        }
        #expect(try c.call("vm.list").arrayValue?.isEmpty == true)
    }
}

/// The kernel event source wakes the daemon only for wake-ups a boost can help: a
/// vCPU thread whose CPU is idle runs at once, so its wake-up and sleep are counted
/// in the kernel (`uncontendedWakeups`) and not sent; one whose CPU is taken is sent
/// at once, and boosted.
@Suite(.serialized, .enabled(if: Requirement.root.shouldRun && Requirement.bpf.shouldRun, "needs root and the bpf syscall"))
struct KernelEventGatingTests {
    /// Attaches a stand-in guest, fed by the kernel's events and its region's watch.
    func attach(_ guest: StandInProcess, as name: String, through c: ControlClient) throws {
        var p = VMAttach.Params()
        p.name = name
        p.pid = guest.pid
        p.threads = guest.threads
        p.shm = guest.region
        p.events = "both"
        _ = try c.call(VMAttach.self, p)
    }

    @Test func onlyWakeUpsThatWaitForTheirCPUReachTheDaemon() throws {
        try Requirement.root.check(); try Requirement.bpf.check()
        let cpus = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        guard cpus >= 2 else { return }
        let cpu = Int(cpus - 1)
        let d = try DaemonProcess()
        let c = try d.client()
        // An idle vCPU that wakes every 2 ms, pinned to the last CPU.
        let guest = try StandInProcess(vcpus: 1, region: "/dev/shm/pvsched-gating-\(getpid())", arguments: ["--idle-wakeup-us", "2000"])
        defer { guest.stop() }
        for t in guest.threads { try LinuxScheduling.setAffinity(ThreadID(t), mask: 1 << UInt64(cpu)) }
        try attach(guest, as: "gating", through: c)
        func sample() throws -> (injections: Int64, uncontended: Int64, boosts: Int64) {
            let s = try c.call("vm.stats", ["vm": "gating"])
            let vcpus = s["vms"]?.arrayValue?.first?["vcpus"]?.arrayValue ?? []
            return (vcpus.reduce(0) { $0 + ($1["eventsByKind"]?["interrupt_injection"]?.intValue ?? 0) },
                    vcpus.reduce(0) { $0 + ($1["uncontendedWakeups"]?.intValue ?? 0) },
                    vcpus.reduce(0) { $0 + ($1["boosts"]?.intValue ?? 0) })
        }
        usleep(300_000)
        // The CPU idle between the wake-ups: most of them are settled in the kernel.
        let a = try sample()
        usleep(1_000_000)
        let b = try sample()
        let idleSettled = b.uncontended - a.uncontended, idleSent = b.injections - a.injections
        #expect(idleSettled > 200, "\(a) -> \(b)")
        #expect(idleSent * 3 < idleSettled, "\(a) -> \(b)")
        // A busy thread on that CPU: every wake-up waits for it, is sent and boosted.
        let stop = Atomic(false)
        let spinner = try PVSchedCore.Thread(name: "spinner") {
            try? LinuxScheduling.setAffinity(LinuxScheduling.currentThread(), mask: 1 << UInt64(cpu))
            while !stop.load(ordering: .relaxed) {}
        }
        usleep(300_000)
        let e = try sample()
        usleep(1_000_000)
        let f = try sample()
        stop.store(true, ordering: .relaxed)
        spinner.join()
        let busySettled = f.uncontended - e.uncontended, busySent = f.injections - e.injections
        #expect(busySent > 200, "\(e) -> \(f)")
        #expect(busySettled * 10 < busySent, "\(e) -> \(f)")
        #expect(f.boosts - e.boosts > 200, "\(e) -> \(f)")
    }

    /// A vCPU thread woken onto its idle CPU and preempted before it sleeps again is
    /// sent then (it waits for its CPU) and boosted; when it sleeps, the boost ends. Its
    /// run must be sent with the wake-up: without it the wake-up's interrupt stayed
    /// pending, `latency-boost` kept the boost through the sleep, and the enforcer
    /// looked at the sleeping thread every 2 ms (2,300 wake-ups a second at 64 idle VMs).
    @Test func aWakeUpSentAtItsPreemptionLeavesNoBoostOnTheSleepingThread() throws {
        try Requirement.root.check(); try Requirement.bpf.check(); try Requirement.realTime.check()
        let cpus = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        guard cpus >= 2 else { return }
        let cpu = Int(cpus - 1)
        let d = try DaemonProcess()
        let c = try d.client()
        // An idle vCPU that wakes every 3 ms and runs 400 µs (its line untouched), pinned.
        let guest = try StandInProcess(vcpus: 1, region: "/dev/shm/pvsched-preempted-\(getpid())",
                                       arguments: ["--idle-wakeup-us", "3000", "--idle-work-us", "400"])
        defer { guest.stop() }
        let tid = try #require(guest.threads.first)
        try LinuxScheduling.setAffinity(ThreadID(tid), mask: 1 << UInt64(cpu))
        try attach(guest, as: "preempted", through: c)
        // A real-time thread on that CPU, above any boost, that wakes every 730 µs for
        // 30 µs: the vCPU mostly wakes onto an idle CPU, and is preempted in about half
        // of its runs.
        let stop = Atomic(false)
        let preempter = try PVSchedCore.Thread(name: "preempter") {
            try? LinuxScheduling.setAffinity(LinuxScheduling.currentThread(), mask: 1 << UInt64(cpu))
            try? LinuxScheduling.setCurrentThread(.fifo(priority: 60))
            while !stop.load(ordering: .relaxed) {
                usleep(730)
                let end = MonotonicClock.nowNs() + 30_000
                while MonotonicClock.nowNs() < end {}
            }
        }
        defer { stop.store(true, ordering: .relaxed); preempter.join() }
        func boosts() throws -> Int64 {
            let s = try c.call("vm.stats", ["vm": "preempted"])
            return s["vms"]?.arrayValue?.first?["vcpus"]?.arrayValue?.first?["boosts"]?.intValue ?? 0
        }
        usleep(300_000)
        let before = try boosts()
        // Samples of the vCPU thread: asleep, and asleep with a real-time policy.
        var asleep = 0, boostedAsleep = 0
        let end = MonotonicClock.nowNs() + 1_500_000_000
        while MonotonicClock.nowNs() < end {
            if let stat = try? String(contentsOfFile: "/proc/\(guest.pid)/task/\(tid)/stat", encoding: .utf8),
               let close = stat.lastIndex(of: ")") {
                let fields = stat[stat.index(after: close)...].split(separator: " ")
                // fields[0] is the state (field 3), fields[38] the policy (field 41).
                if fields.count > 38, fields[0] == "S" {
                    asleep += 1
                    if fields[38] != "0" { boostedAsleep += 1 }
                }
            }
            usleep(200)
        }
        let boosted = try boosts() - before
        #expect(boosted > 100, "only \(boosted) boosts: the preemptions did not happen")
        #expect(asleep > 500)
        #expect(boostedAsleep * 10 < asleep, "boosted in \(boostedAsleep) of \(asleep) samples of the sleeping thread (\(boosted) boosts)")
    }
}

/// The kernel's records carry the vCPU thread's run time where it is current, so
/// that the daemon need not read `/proc/TID/schedstat` at each event.
struct KernelEventRunTimeTests {
    /// Records every event with the run time it came with, and the thread's own CPU
    /// clock at delivery.
    final class RunTimeSink: VMEventSink {
        struct Seen { var event: VCPUEvent; var cpuTime: ThreadCPUTime?; var clockNs: UInt64 }
        let thread: ThreadID
        let seen = Mutex<[Seen]>([])
        init(thread: ThreadID) { self.thread = thread }
        func notify(_ event: VCPUEvent, vcpu: Int, interruptStillQueued: Bool, cpuTime: ThreadCPUTime?) -> NotifyOutcome {
            let now = ThreadCPUClock().cpuTimeNs(of: thread) ?? 0
            seen.withLock { $0.append(Seen(event: event, cpuTime: cpuTime, clockNs: now)) }
            return .unchanged
        }
        func setThread(_ thread: ThreadID?, vcpu: Int) {}
    }

    /// A thread that runs 200 µs and sleeps 2 ms, beside a spinner on its CPU (so its
    /// wake-ups wait and are sent): every wake-up, run and sleep comes with a run time
    /// that lies between the thread's own readings before and after one of its sleeps.
    @Test func wakeUpsRunsAndSleepsComeWithTheThreadsRunTime() throws {
        try Requirement.root.check(); try Requirement.bpf.check()
        let cpus = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        guard cpus >= 2 else { return }
        let cpu = UInt64(cpus - 1)
        let source = try KernelEventSource(object: GuestImage.kvmEventsBPF)
        defer { source.close() }
        let stop = Atomic(false)
        let spinner = try PVSchedCore.Thread(name: "spinner") {
            try? LinuxScheduling.setAffinity(LinuxScheduling.currentThread(), mask: 1 << cpu)
            while !stop.load(ordering: .relaxed) {}
        }
        defer { stop.store(true, ordering: .relaxed); spinner.join() }
        let tid = Atomic<Int32>(0), watched = Atomic(false), looped = Atomic(false), released = Atomic(false)
        let sleeps = Mutex<[(before: UInt64, after: UInt64)]>([])
        let worker = try PVSchedCore.Thread(name: "vcpu-like") {
            let me = LinuxScheduling.currentThread()
            try? LinuxScheduling.setAffinity(me, mask: 1 << cpu)
            tid.store(me.rawValue, ordering: .releasing)
            let clock = ThreadCPUClock()
            while !watched.load(ordering: .acquiring) {
                let before = clock.cpuTimeNs(of: me) ?? 0
                usleep(1000)
                let after = clock.cpuTimeNs(of: me) ?? 0
                sleeps.withLock { $0.append((before, after)) }
            }
            for _ in 0..<200 {
                let end = MonotonicClock.nowNs() + 200_000
                while MonotonicClock.nowNs() < end {}
                let before = clock.cpuTimeNs(of: me) ?? 0
                usleep(2000)
                let after = clock.cpuTimeNs(of: me) ?? 0
                sleeps.withLock { $0.append((before, after)) }
            }
            // Alive, asleep, until every record is read (its clock is read at each).
            let before = clock.cpuTimeNs(of: me) ?? 0
            sleeps.withLock { $0.append((before, .max)) }
            looped.store(true, ordering: .releasing)
            while !released.load(ordering: .acquiring) { usleep(1000) }
        }
        while tid.load(ordering: .acquiring) == 0 { usleep(1000) }
        let thread = ThreadID(tid.load(ordering: .acquiring))
        let sink = RunTimeSink(thread: thread)
        source.watch(slot: 1, process: getpid(), threads: [thread], sink: sink)
        watched.store(true, ordering: .releasing)
        while !looped.load(ordering: .acquiring) { usleep(10_000) }
        usleep(200_000)
        source.unwatch(slot: 1, process: getpid(), threads: [thread])
        let seen = sink.seen.withLock { $0 }, windows = sleeps.withLock { $0 }
        released.store(true, ordering: .releasing)
        worker.join()
        let timed = seen.filter { $0.cpuTime != nil }
        #expect(seen.filter { if case .interruptInjection = $0.event { true } else { false } }.count > 50)
        #expect(seen.filter { $0.event == .halt }.count > 50)
        // Every wake-up, run and sleep carried the run time, of this thread.
        #expect(timed.count == seen.count, "\(seen.count - timed.count) of \(seen.count) without")
        #expect(timed.allSatisfy { $0.cpuTime?.thread == thread })
        var last: UInt64 = 0, outside = 0, ahead = 0
        for s in timed {
            let ns = s.cpuTime!.ns
            #expect(ns >= last, "run times went back: \(last) -> \(ns)")
            last = ns
            if ns > s.clockNs { ahead += 1 }
            // Read while the thread did not run: within one of its sleeps.
            if !windows.contains(where: { ns >= $0.before && ns <= $0.after }) { outside += 1 }
        }
        #expect(ahead == 0, "\(ahead) run times ahead of the thread's clock")
        #expect(outside == 0, "\(outside) of \(timed.count) run times outside every sleep")
    }
}
