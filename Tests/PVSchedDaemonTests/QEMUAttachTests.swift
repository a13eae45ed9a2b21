import Foundation
import PVSchedABI
import PVSchedAttach
import PVSchedControl
import PVSchedCore
import PVSchedExperiments
import PVSchedLinux
import PVSchedTesting
import Synchronization
import Testing

/// Unmodified QEMU (TCG) with a stock Debian kernel and the pvsched_guest module,
/// attached by `pvsched daemon` through QMP and the ivshmem region.
@Suite(.serialized, .enabled(if: Requirement.root.shouldRun && Requirement.qemu.shouldRun, "needs root, QEMU and the Linux guest's packages"))
struct QEMUAttachTests {
    static func guest(_ configure: (inout LinuxGuestOptions) -> Void) throws -> QEMULinuxGuest {
        try Requirement.root.check(); try Requirement.qemu.check()
        var o = LinuxGuestOptions()
        configure(&o)
        return try QEMULinuxGuest(image: try LinuxGuestImage.build(), options: o)
    }

    static func attach(_ d: DaemonProcess, _ g: QEMULinuxGuest, name: String) throws -> CommandResult {
        try d.cli(["vm", "attach", "--qmp", g.qmpPath, "--shm", g.shmPath, "--name", name, "--driver", "latency-boost"])
    }

    static func vm(_ d: DaemonProcess, _ name: String) throws -> JSON? {
        try d.client().call("vm.list").arrayValue?.first { $0["name"]?.stringValue == name }
    }

    @Test func attachesNegotiatesBoostsTheVCPUThreadOfAnRTTaskAndRestoresWhenQEMUIsKilled() throws {
        let g = try Self.guest { $0.run = "rt-burst"; $0.durationS = 60 }
        let d = try DaemonProcess()
        let a = try Self.attach(d, g, name: "lin")
        #expect(a.status == 0, "\(a.stderr)")
        #expect(a.stdout.contains("vCPU threads:"), "\(a.stdout)")
        #expect(try eventually(60) { try Self.vm(d, "lin")?["negotiation"]?.stringValue?.hasPrefix("accepted: pvsched-latency 1.0") == true },
                "\((try? Self.vm(d, "lin"))??.pretty ?? "no vm")")
        #expect(g.waitFor("PVS-NEGOTIATION accepted", timeout: 30), "\(g.console)")
        let tids = try d.vcpus("lin").map(\.tid)
        #expect(tids.count == 2 && tids.allSatisfy { $0 > 0 })

        // While the guest's RT bursts run: its line says so, and a vCPU thread runs real-time.
        // The sampler runs real-time above the boosts: on this 2-CPU host a boosted vCPU
        // and QEMU's boosted main loop would otherwise keep it off both CPUs for the
        // whole burst, and it would look only between bursts.
        let region = try SharedMemoryFile(path: g.shmPath)
        let area = try SharedArea(validating: region.bytes, owner: region)
        final class Seen: @unchecked Sendable { var rtFlag = false, boost = false, mainLoopBoost = false }
        let seen = Seen()
        let pid = g.pid
        let guest = g
        let sampler = try PVSchedCore.Thread {
            try? LinuxScheduling.setCurrentThread(.fifo(priority: 60))
            let deadline = Date().addingTimeInterval(90)
            var k = 0
            while Date() < deadline {
                for v in 0..<2 {
                    if let st = try? area.read(vcpu: v), st.flags.contains(.rtTaskRunning), case .fifo = st.task { seen.rtFlag = true }
                }
                if tids.contains(where: isRealTime) { seen.boost = true }
                if isRealTime(pid) { seen.mainLoopBoost = true }
                k += 1
                if k % 50 == 0, guest.console.contains("PVS-BURSTS-DONE") { break }
                usleep(2000)
            }
        }
        sampler.join()
        let (sawRTFlag, sawBoost, sawMainLoopBoost) = (seen.rtFlag, seen.boost, seen.mainLoopBoost)
        #expect(g.console.contains("PVS-BURSTS-DONE"), "\(g.console)")
        #expect(sawRTFlag, "the guest line never showed an RT task running")
        #expect(sawBoost, "no vCPU thread was boosted while the guest ran RT tasks")
        #expect(sawMainLoopBoost, "QEMU's main loop was not boosted with the vCPUs")
        // The guest sleeps now: every boost is undone, back to SCHED_OTHER.
        #expect(eventually(20) { !tids.contains(where: isRealTime) && !isRealTime(g.pid) })
        let stats = try d.client().call("vm.stats", ["vm": "lin"])
        #expect((stats["vms"]?.arrayValue?.first?["vcpus"]?.arrayValue ?? []).contains { ($0["boosts"]?.intValue ?? 0) > 0 }, "\(stats.pretty)")

        // Killing QEMU detaches the VM; nothing stays boosted, the daemon carries on.
        g.kill()
        #expect(try eventually(10) { try Self.vm(d, "lin")?["state"]?.stringValue?.hasPrefix("ended") == true })
        #expect(try d.vcpus("lin").allSatisfy { !$0.boosted })
        #expect(try d.cli(["vm", "stop", "lin"]).status == 0)
        #expect(try d.cli(["drivers"]).status == 0)
    }

    @Test func aDaemonRestartAttachesTheQEMUVMAgainFromItsStateFile() throws {
        let g = try Self.guest { $0.run = "rt-burst"; $0.durationS = 90 }
        let d = try DaemonProcess()
        #expect(try Self.attach(d, g, name: "lin").status == 0)
        #expect(try eventually(60) { try Self.vm(d, "lin")?["negotiation"]?.stringValue?.hasPrefix("accepted") == true })
        #expect(try eventually(60) { try d.boosts("lin") > 0 })
        try d.restart()
        #expect(try eventually(30) { try Self.vm(d, "lin")?["negotiation"]?.stringValue?.hasPrefix("accepted") == true },
                "\((try? Self.vm(d, "lin"))??.pretty ?? "not attached again")")
        #expect(try Self.vm(d, "lin")?["driver"]?.stringValue == "latency-boost")
        #expect(try d.vcpus("lin").count == 2)
        #expect(try eventually(60) { try d.boosts("lin") > 0 }, "no boost after the restart")
    }

    @Test func aWrongProtocolVersionIsRefusedWithTheReasonOnBothSides() throws {
        let g = try Self.guest { $0.run = "idle"; $0.durationS = 30; $0.moduleArgs = ["protocol_major=9"] }
        let d = try DaemonProcess()
        #expect(try Self.attach(d, g, name: "old").status == 0)
        #expect(try eventually(60) { try Self.vm(d, "old")?["negotiation"]?.stringValue?.hasPrefix("refused:") == true })
        let negotiation = try Self.vm(d, "old")?["negotiation"]?.stringValue ?? ""
        #expect(negotiation.contains("pvsched-latency") && negotiation.contains("9.0"), "\(negotiation)")
        #expect(g.waitFor("PVS-NEGOTIATION refused: no_driver", timeout: 30), "\(g.console)")
    }

    @Test func aGuestWritingGarbageGetsPvschedDisabledNamingTheFieldAndQEMUKeepsRunning() throws {
        let g = try Self.guest { $0.run = "garbage"; $0.durationS = 3 }
        let d = try DaemonProcess()
        #expect(try Self.attach(d, g, name: "bad").status == 0)
        #expect(g.waitFor("PVS-GARBAGE written", timeout: 90), "\(g.console)")
        #expect(try eventually(10) { try Self.vm(d, "bad")?["disabled"]?.stringValue != nil })
        let why = try Self.vm(d, "bad")?["disabled"]?.stringValue ?? ""
        #expect(why.contains("`flags`"), "\(why)")
        #expect(try Self.vm(d, "bad")?["watcher"]?["phase"]?.stringValue?.hasPrefix("disabled") == true)
        // QEMU and the guest carry on, and the guest sees why.
        #expect(g.process.isRunning)
        #expect(g.waitFor("PVS-DONE", timeout: 60), "\(g.console)")
        #expect(g.section("negotiation")?.contains("refused: bad_line") == true, "\(g.console)")
        #expect(try d.vcpus("bad").allSatisfy { !$0.boosted && !isRealTime($0.tid) })
    }

    /// The module unloaded and loaded again 50 times while cyclictest runs in the
    /// guest, the host is busy (2 spinning threads per CPU) and the daemon serves
    /// the VM: no soft lockup, no RCU stall. (Under QEMU 7.2's multi-threaded TCG an
    /// unload used to wedge the guest now and then, the patching of kernel text for
    /// the tracepoints racing stale translations on the other vCPU: see the module's
    /// `pvs_patch`.)
    @Test func fiftyUnloadsUnderLoadNeverWedgeTheGuest() throws {
        let g = try Self.guest { $0.run = "unload-cycle"; $0.unloadCycles = 50; $0.waitForHostS = 10 }
        let d = try DaemonProcess()
        #expect(try Self.attach(d, g, name: "cycles").status == 0)
        let busy = try BusyThreads(perCPU: 2)
        defer { busy.stop() }
        #expect(g.waitFor("PVS-END kernel-problems", timeout: 300), "\(g.console.suffix(3000))")
        #expect(g.console.contains("PVS-UNLOAD-CYCLES 50"), "\(g.console.suffix(3000))")
        #expect(g.section("kernel-problems")?.trimmingCharacters(in: .whitespacesAndNewlines) == "", "\(g.section("kernel-problems") ?? "")")
    }

    @Test func unloadingTheModuleWithdrawsTheAreaAndTheStatusGoesToDisabled() throws {
        let g = try Self.guest { $0.run = "idle"; $0.durationS = 2; $0.unloadModule = true }
        let d = try DaemonProcess()
        #expect(try Self.attach(d, g, name: "gone").status == 0)
        #expect(g.waitFor("PVS-MODULE unloaded", timeout: 90), "\(g.console)")
        #expect(try eventually(10) { try Self.vm(d, "gone")?["watcher"]?["phase"]?.stringValue == "waiting for the guest" })
        #expect(try Self.vm(d, "gone")?["negotiation"]?.stringValue == "no area registered")
        let region = try SharedMemoryFile(path: g.shmPath)
        let raw = region.bytes
        let status0 = raw.load(fromByteOffset: Int(PVSCHED_REGION_HEADER_SIZE) + PVSCHED_OFF_HOST_STATUS, as: UInt32.self)
        #expect(status0 == PVSCHED_STATUS_DISABLED)
        #expect(raw.load(fromByteOffset: PVSCHED_OFF_MAGIC, as: UInt32.self) == 0)
    }
}

/// Threads that spin on every CPU (host contention), until stopped.
final class BusyThreads: Sendable {
    private let threads: Mutex<[PVSchedCore.Thread]>
    init(perCPU: Int) throws {
        let cpus = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        var all: [PVSchedCore.Thread] = []
        let stop = StopBox()
        for cpu in 0..<cpus {
            for _ in 0..<perCPU {
                all.append(try PVSchedCore.Thread(name: "test-busy") {
                    try? LinuxScheduling.setAffinity(LinuxScheduling.currentThread(), mask: 1 << UInt64(cpu))
                    var x: UInt64 = 1
                    while !stop.flag.load(ordering: .relaxed) { for _ in 0..<10_000 { x = x &* 6364136223846793005 &+ 1 } }
                    if x == 0 { print("") }
                })
            }
        }
        threads = Mutex(all)
        self.stopBox = stop
    }
    private let stopBox: StopBox
    private final class StopBox: Sendable { let flag = Atomic(false) }
    func stop() {
        stopBox.flag.store(true, ordering: .relaxed)
        for t in threads.withLock({ t in let a = t; t = []; return a }) { t.join() }
    }
}
