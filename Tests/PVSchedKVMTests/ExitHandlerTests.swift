import PVSchedABI
import PVSchedCore
import PVSchedHost
@testable import PVSchedKVM
import PVSchedTesting
import Synchronization
import Testing

/// A sink that records every event it is sent.
final class RecordingSink: VMEventSink {
    let events = Mutex<[VCPUEvent]>([])
    func notify(_ event: VCPUEvent, vcpu: Int, interruptStillQueued: Bool, cpuTime: ThreadCPUTime?) -> NotifyOutcome {
        events.withLock { $0.append(event) }
        return .unchanged
    }
    func setThread(_ thread: ThreadID?, vcpu: Int) {}
    func setArea(_ area: SharedArea?) {}
    func enforceBudgets() -> Int { 0 }
    var all: [VCPUEvent] { events.withLock { $0 } }
}

/// The exit path with synthetic exits and port accesses, no /dev/kvm: the exit
/// handler, the port bus and the devices as the VMM wires them.
struct ExitHandlerTests {
    static func out(_ port: UInt32, _ value: UInt32, size: Int = 4) -> VMExit {
        .io(PortIO(port: UInt16(port), isWrite: true, size: size,
                   data: (0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }))
    }
    static func inp(_ port: UInt32) -> VMExit { .io(PortIO(port: UInt16(port), isWrite: false, size: 4)) }

    struct Rig {
        let sink = RecordingSink()
        let console = Console(vcpus: 2)
        let memory: GuestMemory
        let device: PVSchedDevice
        let handler: ExitHandler
        let link: VMHostLink?

        init(pvsched: Bool = true) throws {
            memory = try GuestMemory(size: 1 << 20)
            let link: VMHostLink? = pvsched ? try PVSchedHost(actuator: RecordingActuator()).link(name: "exits", vcpus: 2) : nil
            self.link = link
            device = PVSchedDevice(vcpus: 2, memory: memory, registrar: link?.registrar, vmName: "exits", logger: .init(label: "test"))
            handler = ExitHandler(bus: PortBus([console, ExitPort(), TimerDevice(vcpus: 2), device]), events: sink)
        }

        func handle(_ exit: VMExit, vcpu: Int = 0) -> (ExitAction, UInt32?) {
            let r = handler.handle(exit, vcpu: vcpu) { RegisterDump(rip: 0x1234, rsp: 0x8000, cr0: nil, cr4: nil, efer: nil) }
            return (r.action, r.reply)
        }

        /// Registers an area at `gpa` of `size` bytes from `vcpu`; returns (status, reason).
        func register(gpa: UInt64, size: UInt32, vcpu: Int = 0) -> (UInt32, UInt32) {
            _ = handle(out(PVSCHED_DEV_AREA_LO, UInt32(truncatingIfNeeded: gpa)), vcpu: vcpu)
            _ = handle(out(PVSCHED_DEV_AREA_HI, UInt32(truncatingIfNeeded: gpa >> 32)), vcpu: vcpu)
            _ = handle(out(PVSCHED_DEV_AREA_SIZE, size), vcpu: vcpu)
            _ = handle(out(PVSCHED_DEV_COMMAND, PVSCHED_CMD_REGISTER), vcpu: vcpu)
            return (handle(inp(PVSCHED_DEV_STATUS), vcpu: vcpu).1 ?? 0, handle(inp(PVSCHED_DEV_REASON), vcpu: vcpu).1 ?? 0)
        }
    }

    @Test func portWritesReachTheirDeviceAndTheDriverSeesTheExitAfterwards() throws {
        let rig = try Rig()
        for b in "hi\n".utf8 { #expect(rig.handle(Self.out(PVSCHED_PORT_CONSOLE, UInt32(b), size: 1)).0 == .resume) }
        #expect(rig.console.output == "hi\n")
        #expect(rig.sink.all.allSatisfy { $0 == .vmExit(.io(port: UInt16(PVSCHED_PORT_CONSOLE), write: true)) })
        #expect(rig.handle(Self.out(PVSCHED_DEV_DOORBELL, 0)).0 == .resume)
        #expect(rig.sink.all.last == .vmExit(.doorbell))
        #expect(rig.handle(Self.out(PVSCHED_PORT_EXIT, 7)).0 == .finish(.exited(code: 7)))
    }

    @Test func readsAreAnsweredAndUnclaimedPortsReadAllOnes() throws {
        let rig = try Rig()
        #expect(rig.handle(Self.inp(PVSCHED_DEV_VCPU_ID), vcpu: 1).1 == 1)
        #expect(rig.handle(Self.inp(0x3F8)).1 == 0xFFFF_FFFF)
        #expect(rig.handle(Self.out(0x3F8, 1)).0 == .resume, "a write nobody claims is ignored")
    }

    @Test func haltWaitsForAnInterruptAfterTheExitAndHaltEvents() throws {
        let rig = try Rig()
        #expect(rig.handle(.halt).0 == .waitForInterrupt)
        #expect(rig.sink.all == [.vmExit(.halt), .halt])
        #expect(rig.handle(.interrupted).0 == .resume)
        #expect(rig.handle(.interruptWindowOpen).0 == .resume)
        #expect(Array(rig.sink.all.suffix(2)) == [.vmExit(.intr), .vmExit(.interruptWindow)])
    }

    @Test func failuresEndTheVMWithATypedReason() throws {
        let rig = try Rig()
        let regs = RegisterDump(rip: 0x1234, rsp: 0x8000, cr0: nil, cr4: nil, efer: nil)
        #expect(rig.handle(.mmio(address: 0xFEE0_0000, write: true, length: 4)).0
                == .finish(.failed(vcpu: 0, failure: .mmioOutsideRAM(address: 0xFEE0_0000, write: true))))
        #expect(rig.handle(.shutdown).0 == .finish(.failed(vcpu: 0, failure: .shutdown(registers: regs))))
        #expect(rig.handle(.internalError(suberror: 1)).0 == .finish(.failed(vcpu: 0, failure: .internalError(suberror: 1, registers: regs))))
        #expect(rig.handle(.failEntry(reason: 9)).0 == .finish(.failed(vcpu: 0, failure: .failEntry(reason: 9))))
        #expect(rig.handle(.unknown(reason: 77)).0 == .finish(.failed(vcpu: 0, failure: .unhandled(reason: 77))))
    }

    @Test func hostileRegistrationsAreRefusedWithTheirReasonAndAValidOneIsAccepted() throws {
        let rig = try Rig()
        let areaSize = UInt32(SharedAreaWriter.size(vcpus: 2))
        // Outside guest RAM, wrapping around, and straddling its end.
        #expect(rig.register(gpa: 1 << 40, size: areaSize) == (PVSCHED_DEV_REFUSED, PVSCHED_REASON_OUT_OF_RAM))
        #expect(rig.register(gpa: UInt64.max - 10, size: areaSize) == (PVSCHED_DEV_REFUSED, PVSCHED_REASON_OUT_OF_RAM))
        #expect(rig.register(gpa: (1 << 20) - 64, size: areaSize) == (PVSCHED_DEV_REFUSED, PVSCHED_REASON_OUT_OF_RAM))
        #expect(rig.register(gpa: 0x10000, size: 0xFFFF_FFFF) == (PVSCHED_DEV_REFUSED, PVSCHED_REASON_OUT_OF_RAM))
        // Too small, and a header of zeros.
        #expect(rig.register(gpa: 0x10000, size: 8) == (PVSCHED_DEV_REFUSED, PVSCHED_REASON_TOO_SMALL))
        #expect(rig.register(gpa: 0x10000, size: areaSize) == (PVSCHED_DEV_REFUSED, PVSCHED_REASON_BAD_HEADER))
        // A header for 3 vCPUs in a 2-vCPU VM, then a valid one.
        let writer = SharedAreaWriter(base: rig.memory.base + 0x10000, size: SharedAreaWriter.size(vcpus: 3))
        writer.writeHeader(vcpus: 3)
        #expect(rig.register(gpa: 0x10000, size: UInt32(SharedAreaWriter.size(vcpus: 3))) == (PVSCHED_DEV_REFUSED, PVSCHED_REASON_VCPU_MISMATCH))
        SharedAreaWriter(base: rig.memory.base + 0x10000, size: Int(areaSize)).writeHeader(vcpus: 2)
        #expect(rig.register(gpa: 0x10000, size: areaSize) == (PVSCHED_DEV_ACCEPTED, PVSCHED_REASON_NONE))
        // An unknown command, and accesses from a vCPU the VM does not have.
        _ = rig.handle(Self.out(PVSCHED_DEV_COMMAND, 99))
        #expect(rig.handle(Self.inp(PVSCHED_DEV_STATUS)).1 == PVSCHED_DEV_REFUSED)
        #expect(rig.register(gpa: 0x10000, size: areaSize, vcpu: 9) == (0xFFFF_FFFF, 0xFFFF_FFFF))
        #expect(rig.device.log.count == 9, "every command is logged; the out-of-range vCPU's is ignored")
    }

    @Test func aVMWithoutPvschedRefusesEveryRegistration() throws {
        let rig = try Rig(pvsched: false)
        let areaSize = UInt32(SharedAreaWriter.size(vcpus: 2))
        SharedAreaWriter(base: rig.memory.base + 0x10000, size: Int(areaSize)).writeHeader(vcpus: 2)
        #expect(rig.register(gpa: 0x10000, size: areaSize) == (PVSCHED_DEV_REFUSED, PVSCHED_REASON_NO_DRIVER))
    }
}
