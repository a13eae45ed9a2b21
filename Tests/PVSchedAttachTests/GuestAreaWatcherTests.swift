import Foundation
import PVSchedABI
import PVSchedAttach
import PVSchedCore
import PVSchedHost
import PVSchedLinux
import PVSchedTesting
import Testing

/// The shared-memory transport without QEMU: a /dev/shm file stands in for the
/// ivshmem region, `SharedAreaWriter` for the guest module, a recording actuator
/// for the host's threads.
final class WatchedVM {
    let path = "/dev/shm/pvsched-watch-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let region: SharedMemoryFile
    let writer: SharedAreaWriter
    let actuator = RecordingActuator()
    let host: PVSchedHost
    let session: AttachedVMSession
    let watcher: RegionWatch
    let vcpus: Int

    init(vcpus: Int = 2, settings: RegionWatch.Settings = .init(headerPollNs: 1_000_000)) throws {
        self.vcpus = vcpus
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0, ftruncate(fd, 1 << 20) == 0 else { throw CocoaError(.fileWriteUnknown) }
        close(fd)
        region = try SharedMemoryFile(path: path)
        writer = SharedAreaWriter(base: region.bytes.baseAddress!, size: SharedAreaWriter.size(vcpus: vcpus))
        host = try PVSchedHost(actuator: actuator)
        var spec = VMSpec(name: "watched", source: .inProcess(vcpus: vcpus, summary: "test"), area: .region(region), driver: "latency-boost")
        spec.watch = settings
        session = try host.attach(spec)
        for i in 0..<vcpus { session.events.setThread(ThreadID(Int32(1000 + i)), vcpu: i) }
        watcher = try #require(session.watch)
    }

    deinit {
        session.stop()
        unlink(path)
    }

    /// Writes a header the way the module does: generation bumped, magic last.
    func register(vcpus: Int? = nil, version: ProtocolVersion? = nil) {
        let generation = writer.header.pointee.guest_generation &+ 1
        writer.writeHeader(vcpus: vcpus ?? self.vcpus, version: version ?? .latencyProtocol, generation: generation)
    }

    /// The guest runs a FIFO 80 task on `vcpu` (its line says so).
    func runRealTimeTask(vcpu: Int) {
        writer.update(vcpu: vcpu) { g in
            g.flags = GuestVCPUState.Flags.rtTaskRunning.rawValue
            g.task_policy = PVSCHED_TASK_FIFO
            g.task_priority = 80
        }
    }

    var hostNegotiation: UInt32 { region.bytes.load(fromByteOffset: PVSCHED_OFF_HOST_NEGOTIATION, as: UInt32.self) }
    var hostReason: UInt32 { region.bytes.load(fromByteOffset: PVSCHED_OFF_HOST_REASON, as: UInt32.self) }
    func hostStatus(_ vcpu: Int) -> UInt32 { writer.vcpu(vcpu).pointee.host.status }
    var boosted: Set<ThreadID> {
        var s = Set<ThreadID>()
        for c in actuator.calls {
            switch c {
            case .apply(_, let t): s.insert(t)
            case .restore(let t): s.remove(t)
            }
        }
        return s
    }
}

func eventually(_ seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}

@Suite(.serialized) struct GuestAreaWatcherTests {
    @Test func aHeaderWrittenAfterAttachIsAcceptedAndTheAnswerWrittenBack() throws {
        let vm = try WatchedVM()
        #expect(vm.watcher.phase == .waiting)
        #expect(vm.hostNegotiation == PVSCHED_DEV_IDLE)
        vm.register()
        #expect(eventually { if case .accepted = vm.watcher.phase { return true }; return false })
        #expect(vm.hostNegotiation == PVSCHED_DEV_ACCEPTED)
        #expect(eventually { vm.hostStatus(0) == PVSCHED_STATUS_NORMAL })
        #expect(vm.session.binding?.negotiation == .accepted("pvsched-latency 1.0"))
    }

    @Test func aLineChangeBoostsTheVCPUAndTheMainLoopAndGoingIdleUndoesBoth() throws {
        let vm = try WatchedVM()
        vm.session.binding?.setCompanionThreads([ThreadID(999)])
        vm.register()
        #expect(eventually { vm.hostNegotiation == PVSCHED_DEV_ACCEPTED })
        vm.runRealTimeTask(vcpu: 1)
        #expect(eventually { vm.boosted == [ThreadID(1001), ThreadID(999)] }, "\(vm.actuator.calls)")
        #expect(vm.actuator.calls.contains(.apply(.fifo(priority: 11), ThreadID(999))), "the main loop runs one above the vCPUs")
        #expect(eventually { vm.hostStatus(1) == PVSCHED_STATUS_BOOSTED })
        vm.writer.update(vcpu: 1) { g in
            g.flags = GuestVCPUState.Flags.idle.rawValue
            g.task_policy = PVSCHED_TASK_NORMAL
            g.task_priority = 0
        }
        #expect(eventually { vm.boosted.isEmpty }, "\(vm.actuator.calls)")
        #expect((vm.watcher.stats.guestUpdates) >= 2)
    }

    /// While the VM's events say every vCPU thread sleeps, its watch rests (no
    /// looks, however long); a thread that runs again brings a look within the busy
    /// poll period, and the change it wrote is seen.
    @Test func aWatchRestsWhileEveryVCPUThreadSleepsAndWakesWithThem() throws {
        let vm = try WatchedVM(settings: .init(busyPollNs: 200_000, idlePollNs: 1_000_000, headerPollNs: 1_000_000))
        vm.register()
        #expect(eventually { vm.hostNegotiation == PVSCHED_DEV_ACCEPTED })
        for v in 0..<vm.vcpus { vm.session.events.notify(.halt, vcpu: v) }
        usleep(20_000)  // the last look after they went to sleep
        let resting = vm.watcher.stats.polls
        usleep(200_000)
        #expect(vm.watcher.stats.polls == resting, "looks while every vCPU slept")
        // vCPU 1 runs and writes its line: the entry rings the watch's bell.
        vm.session.events.notify(.vmEntry, vcpu: 1)
        vm.runRealTimeTask(vcpu: 1)
        #expect(eventually(1) { vm.boosted.contains(ThreadID(1001)) }, "\(vm.actuator.calls)")
        #expect(vm.watcher.stats.polls > resting)
    }

    /// A vCPU that runs briefly and halts (a periodic guest's tick) rings the watch's
    /// bell, but its halt read its line: once every vCPU sleeps so, the look planned
    /// for it is dropped and the poller does not wake (before: one wake-up per period
    /// that read nothing, 20% of a core at 64 busy VMs). A vCPU that stays awake is
    /// still looked at.
    @Test func aLookPlannedForVCPUsThatHaltedSinceDoesNotWakeThePoller() throws {
        let vm = try WatchedVM(settings: .init(busyPollNs: 1_000_000, idlePollNs: 1_000_000, headerPollNs: 1_000_000))
        vm.register()
        #expect(eventually { vm.hostNegotiation == PVSCHED_DEV_ACCEPTED })
        for v in 0..<vm.vcpus { vm.session.events.notify(.halt, vcpu: v) }
        usleep(20_000)
        let before = vm.host.serviceCounters.pollerWakeUps
        // 20 periods of 3 ms: vCPU 0 runs and halts within its busy poll period.
        for _ in 0..<20 {
            vm.session.events.notify(.vmEntry, vcpu: 0)
            vm.session.events.notify(.halt, vcpu: 0)
            usleep(3_000)
        }
        let periods = vm.host.serviceCounters.pollerWakeUps - before
        #expect(periods <= 2, "the poller woke \(periods) times for 20 periods that read nothing")
        // vCPU 1 runs and stays awake: it is looked at, and its change seen.
        vm.session.events.notify(.vmEntry, vcpu: 1)
        vm.runRealTimeTask(vcpu: 1)
        #expect(eventually(1) { vm.boosted.contains(ThreadID(1001)) }, "\(vm.actuator.calls)")
    }

    @Test func aPublishedDeadlineBoostsShortlyBeforeItAndNotAtOnce() throws {
        let lead: UInt64 = 2_000_000
        let vm = try WatchedVM(settings: .init(headerPollNs: 1_000_000))
        vm.session.binding?.deadlines.leadNs = lead
        vm.register()
        #expect(eventually { vm.hostNegotiation == PVSCHED_DEV_ACCEPTED })
        // The guest's clock runs 7 s behind the host's; its deadline is 30 ms ahead.
        let offset: UInt64 = 7_000_000_000
        let written = MonotonicClock.nowNs()
        vm.writer.update(vcpu: 0) { g in
            g.flags = GuestVCPUState.Flags.idle.rawValue
            g.guest_clock_ns = written - offset
            g.next_deadline_ns = written - offset + 30_000_000
        }
        #expect(eventually(2) { vm.boosted.contains(ThreadID(1000)) })
        let boostedAt = MonotonicClock.nowNs()
        let early = Int64(boostedAt) - Int64(written + 30_000_000 - lead)
        // Not before the lead (a little slack for the clock mapping), not long after the deadline.
        #expect(early > -1_000_000, "boosted \(-early) ns before the lead time")
        #expect(boostedAt < written + 30_000_000 + 10_000_000)
        #expect(eventually { vm.session.binding?.totals.eventsByKind.deadline == 1 })
    }

    @Test func aLineWithUnknownFlagsDisablesPvschedNamesTheFieldAndTellsTheGuest() throws {
        let vm = try WatchedVM()
        vm.register()
        #expect(eventually { vm.hostNegotiation == PVSCHED_DEV_ACCEPTED })
        vm.writer.update(vcpu: 0) { $0.flags = GuestVCPUState.Flags.inIRQ.rawValue }
        #expect(eventually { !vm.boosted.isEmpty })
        vm.writer.update(vcpu: 0) { $0.flags = 0xFFFF_0000 }
        #expect(eventually { if case .disabled = vm.watcher.phase { return true }; return false })
        #expect("\(vm.watcher.phase)".contains("`flags`"))
        #expect(vm.hostNegotiation == PVSCHED_DEV_REFUSED)
        #expect(vm.hostReason == PVSCHED_REASON_BAD_LINE)
        #expect(vm.hostStatus(0) == PVSCHED_STATUS_DISABLED && vm.hostStatus(1) == PVSCHED_STATUS_DISABLED)
        #expect(eventually { vm.boosted.isEmpty }, "disabling undoes every boost")
        // A guest that registers again (a new generation) is heard again.
        vm.register()
        #expect(eventually { if case .accepted = vm.watcher.phase { return true }; return false })
    }

    @Test func aProtocolNoDriverSpeaksIsRefusedWithItsReasonCode() throws {
        let vm = try WatchedVM()
        vm.register(version: ProtocolVersion(major: 9, minor: 0))
        #expect(eventually { if case .refused = vm.watcher.phase { return true }; return false })
        #expect(vm.hostNegotiation == PVSCHED_DEV_REFUSED)
        #expect(vm.hostReason == PVSCHED_REASON_NO_DRIVER)
    }

    @Test func aVCPUCountThatDiffersFromTheVMsIsRefused() throws {
        let vm = try WatchedVM(vcpus: 2)
        vm.register(vcpus: 3)
        #expect(eventually { vm.hostNegotiation == PVSCHED_DEV_REFUSED })
        #expect(vm.hostReason == PVSCHED_REASON_VCPU_MISMATCH)
    }

    @Test func aWithdrawnRegionUndoesTheBoostsAndTheStatusGoesToDisabled() throws {
        let vm = try WatchedVM()
        vm.register()
        #expect(eventually { vm.hostNegotiation == PVSCHED_DEV_ACCEPTED })
        vm.writer.update(vcpu: 0) { $0.flags = GuestVCPUState.Flags.boostRequest.rawValue }
        #expect(eventually { vm.boosted.contains(ThreadID(1000)) })
        vm.writer.header.pointee.magic = 0
        #expect(eventually { vm.watcher.phase == .waiting })
        #expect(eventually { vm.boosted.isEmpty })
        #expect(vm.hostStatus(0) == PVSCHED_STATUS_DISABLED)
        #expect(vm.session.binding?.negotiation == NegotiationStatus.none)
    }
}

@Suite struct VCPUThreadNamingTests {
    @Test func eachVMMsVCPUThreadNamesGiveTheirIndexAndNothingElseDoes() {
        #expect(VCPUThreadNaming.crosvm.vcpuIndex(threadName: "crosvm_vcpu3") == 3)
        #expect(VCPUThreadNaming.cloudHypervisor.vcpuIndex(threadName: "vcpu12") == 12)
        #expect(VCPUThreadNaming.firecracker.vcpuIndex(threadName: "fc_vcpu 0") == 0)
        #expect(VCPUThreadNaming.qemu.vcpuIndex(threadName: "CPU 1/KVM") == 1)
        #expect(VCPUThreadNaming.qemu.vcpuIndex(threadName: "CPU 2/TCG") == 2)
        for bad in ["crosvm_vcpu", "crosvm_vcpu-1", "crosvm_vcpux", "vcpu", "fc_vcpu", "CPU 1/XYZ", "CPU /KVM", "crosvm_vcpu99999"] {
            #expect(VCPUThreadNaming.allCases.allSatisfy { $0.vcpuIndex(threadName: bad) == nil }, "\(bad)")
        }
    }

    @Test func threadsOfThisProcessAreFoundByName() throws {
        // Name two threads of ours like cloud-hypervisor's vCPU threads.
        let ready = DispatchSemaphore(value: 0), done = DispatchSemaphore(value: 0)
        for i in 0..<2 {
            Thread.detachNewThread {
                let tid = LinuxScheduling.currentThread().rawValue
                try? "vcpu\(i)".write(toFile: "/proc/self/task/\(tid)/comm", atomically: false, encoding: .utf8)
                ready.signal()
                done.wait()
            }
        }
        ready.wait(); ready.wait()
        defer { done.signal(); done.signal() }
        let found = VCPUThreads.byName(pid: getpid(), naming: .cloudHypervisor)
        #expect(found?.vcpus.count == 2)
        #expect(found?.vcpus.allSatisfy { VCPUThreads.isThread($0, of: getpid()) } == true)
        #expect(VCPUThreads.byName(pid: getpid(), naming: .crosvm) == nil)
    }
}

@Suite struct CyclictestOutputTests {
    static let sample = """
    # /dev/cpu_dma_latency set to 0us
    # Histogram
    000000 000000
    000001 000010
    000002 000005
    000003 000001
    # Total: 000000016
    # Min Latencies: 00001
    # Avg Latencies: 00001
    # Max Latencies: 00250
    # Histogram Overflows: 00002
    # Histogram Overflow at cycle number:
    # Thread 0: 00007 00011
    """

    @Test func aHistogramIsReadWithItsMaxAndOverflows() throws {
        let out = try CyclictestOutput.parse(Self.sample)
        #expect(out.buckets.count == 4)
        #expect(out.buckets[1] == (1, 10))
        #expect(out.maxUs == 250)
        #expect(out.overflows == 2)
    }

    @Test func malformedOutputIsAnErrorThatQuotesTheLine() {
        for bad in ["", "# Max Latencies: 00010", "000001 000002\n000003", "000001 000002 3\n# Max Latencies: 1",
                    "000002 1\n000001 1\n# Max Latencies: 2", "1 99999999999999999\n# Max Latencies: 1",
                    "1 1\n# Max Latencies: x", "ERROR: shm_open No such file or directory"] {
            #expect(throws: CyclictestOutput.ParseError.self, "\(bad)") { try CyclictestOutput.parse(bad) }
        }
    }
}
