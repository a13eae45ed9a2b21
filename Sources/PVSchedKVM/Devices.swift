import Atomics
import CKVM
import Logging
import PVSchedABI
import PVSchedCore
import Synchronization

/// The guest console (port 0xE9): collects bytes per vCPU and hands out whole
/// lines, so vCPUs printing at once do not interleave mid-line.
final class Console: PortDevice {
    private struct State { var all: [UInt8] = []; var lines: [[UInt8]] }
    private let state: Mutex<State>
    private let sink: (@Sendable (String) -> Void)?
    static let maxBytes = 1 << 20

    /// `sink` receives every complete line as it is printed.
    init(vcpus: Int, sink: (@Sendable (String) -> Void)? = nil) {
        state = Mutex(State(lines: Array(repeating: [], count: vcpus)))
        self.sink = sink
    }

    var ports: ClosedRange<UInt16> { UInt16(PVSCHED_PORT_CONSOLE)...UInt16(PVSCHED_PORT_CONSOLE) }
    func write(_ io: PortIO, vcpu: Int) -> PortEffect { write(io.data, vcpu: vcpu); return .none }
    func read(port: UInt16, vcpu: Int) -> UInt32 { 0xFFFF_FFFF }

    func write(_ bytes: [UInt8], vcpu: Int) {
        var done: [String] = []
        state.withLock { s in
            for b in bytes {
                if b == UInt8(ascii: "\n") {
                    if s.all.count < Self.maxBytes { s.all += s.lines[vcpu]; s.all.append(b) }
                    done.append(String(decoding: s.lines[vcpu], as: UTF8.self))
                    s.lines[vcpu].removeAll(keepingCapacity: true)
                } else if s.lines[vcpu].count < 4096 {
                    s.lines[vcpu].append(b)
                }
            }
        }
        if let sink { done.forEach(sink) }
    }

    /// Every complete line printed so far.
    var output: String { state.withLock { String(decoding: $0.all, as: UTF8.self) } }
}

/// The pvsched virtual device: the guest registers the guest-physical address
/// of its shared area and advertises its protocol (in the area's header); the
/// VMM checks that the area lies inside guest RAM, hands it to the host link's
/// registrar (which validates the header and negotiates a driver), and answers
/// accepted or refused with a reason. A doorbell
/// register gives the guest a synchronous exit to be deboosted at once.
final class PVSchedDevice: PortDevice {
    private struct Latch { var lo: UInt32 = 0; var hi: UInt32 = 0; var size: UInt32 = 0
                           var status: UInt32 = PVSCHED_DEV_IDLE; var reason: UInt32 = PVSCHED_REASON_NONE }
    private let latches: Mutex<[Latch]>
    private let messages = Mutex<[String]>([])
    private let doorbells = ManagedAtomic<UInt64>(0)
    private let memory: GuestMemory
    /// Where registrations go (nil: the VM runs without pvsched and every one is refused).
    private let registrar: (any SharedAreaRegistrar)?
    private let vmName: String
    private let logger: Logger

    init(vcpus: Int, memory: GuestMemory, registrar: (any SharedAreaRegistrar)?, vmName: String, logger: Logger) {
        latches = Mutex(Array(repeating: Latch(), count: vcpus))
        self.memory = memory; self.registrar = registrar; self.vmName = vmName; self.logger = logger
    }

    var ports: ClosedRange<UInt16> { UInt16(PVSCHED_DEV_PORT_BASE)...UInt16(PVSCHED_DEV_PORT_END - 1) }

    /// Human-readable results of every register command, in order.
    var log: [String] { messages.withLock { $0 } }
    var doorbellCount: UInt64 { doorbells.load(ordering: .relaxed) }

    func write(_ io: PortIO, vcpu: Int) -> PortEffect {
        guard vcpu >= 0, vcpu < latches.withLock({ $0.count }) else { return .none }
        let v = io.value
        switch UInt32(io.port) {
        case PVSCHED_DEV_AREA_LO: latches.withLock { $0[vcpu].lo = v }
        case PVSCHED_DEV_AREA_HI: latches.withLock { $0[vcpu].hi = v }
        case PVSCHED_DEV_AREA_SIZE: latches.withLock { $0[vcpu].size = v }
        case PVSCHED_DEV_COMMAND: command(v, vcpu: vcpu)
        case PVSCHED_DEV_DOORBELL: doorbells.wrappingIncrement(ordering: .relaxed)  // the exit itself is the event
        default: break
        }
        return .none
    }

    func read(port: UInt16, vcpu: Int) -> UInt32 {
        latches.withLock { l in
            guard vcpu >= 0, vcpu < l.count else { return 0xFFFF_FFFF }
            switch UInt32(port) {
            case PVSCHED_DEV_STATUS: return l[vcpu].status
            case PVSCHED_DEV_REASON: return l[vcpu].reason
            case PVSCHED_DEV_VCPU_ID: return UInt32(vcpu)
            default: return 0xFFFF_FFFF
            }
        }
    }

    private func command(_ cmd: UInt32, vcpu: Int) {
        let latch = latches.withLock { $0[vcpu] }
        let result: (UInt32, UInt32, String)
        switch cmd {
        case PVSCHED_CMD_REGISTER:
            result = register(gpa: UInt64(latch.hi) << 32 | UInt64(latch.lo), size: Int(latch.size))
        case PVSCHED_CMD_UNREGISTER:
            registrar?.unregister()
            result = (PVSCHED_DEV_ACCEPTED, PVSCHED_REASON_NONE, "area unregistered")
        default:
            result = (PVSCHED_DEV_REFUSED, PVSCHED_REASON_BAD_HEADER, "unknown command \(cmd)")
        }
        latches.withLock { $0[vcpu].status = result.0; $0[vcpu].reason = result.1 }
        messages.withLock { $0.append(result.2) }
        if result.0 == PVSCHED_DEV_REFUSED {
            logger.warning("pvsched area refused", metadata: ["vm": "\(vmName)", "reason": "\(result.2)"])
        }
    }

    private func register(gpa: UInt64, size: Int) -> (UInt32, UInt32, String) {
        let refused = PVSCHED_DEV_REFUSED
        guard let bytes = memory.bytes(at: gpa, length: size) else {
            let message = "area 0x\(String(gpa, radix: 16)) + \(size) bytes is not inside guest RAM (\(memory.size) bytes)"
            registrar?.reportRefusal(AreaRefusal(code: PVSCHED_REASON_OUT_OF_RAM, message: message))
            return (refused, PVSCHED_REASON_OUT_OF_RAM, "refused: \(message)")
        }
        guard let registrar else {
            return (refused, PVSCHED_REASON_NO_DRIVER, "refused: this VM runs without pvsched")
        }
        switch registrar.register(area: bytes, owner: memory) {
        case .success(let accepted):
            return (PVSCHED_DEV_ACCEPTED, PVSCHED_REASON_NONE, "accepted: \(accepted)")
        case .failure(let refusal):
            return (refused, refusal.code, "refused: \(refusal.message)")
        }
    }
}

/// A one-shot timer per vCPU (port PVSCHED_PORT_TIMER_ARM): the guest arms it
/// with a delay in µs; a device thread raises PVSCHED_VECTOR_TIMER on that vCPU
/// when it expires, through the same injection path as any device interrupt.
// @unchecked Sendable: `thread` is set by start() and cleared by stop(), which the VM calls from one thread; the rest is locked or atomic.
final class TimerDevice: PortDevice, @unchecked Sendable {
    private let deadlines: Mutex<[UInt64]>
    private let generation = FutexWord()
    private let running = ManagedAtomic(false)
    private var thread: PVSchedCore.Thread?

    init(vcpus: Int) { deadlines = Mutex(Array(repeating: 0, count: vcpus)) }

    var ports: ClosedRange<UInt16> { UInt16(PVSCHED_PORT_TIMER_ARM)...UInt16(PVSCHED_PORT_TIMER_ARM) }
    func write(_ io: PortIO, vcpu: Int) -> PortEffect { arm(vcpu: vcpu, afterUs: io.value); return .none }
    func read(port: UInt16, vcpu: Int) -> UInt32 { 0xFFFF_FFFF }

    func arm(vcpu: Int, afterUs: UInt32) {
        guard vcpu >= 0, vcpu < deadlines.withLock({ $0.count }) else { return }
        let deadline = afterUs == 0 ? 0 : MonotonicClock.nowNs() &+ UInt64(afterUs) * 1000
        deadlines.withLock { $0[vcpu] = deadline }
        generation.bumpAndWake(1)
    }

    /// Starts the device thread; `raise` delivers its interrupts.
    func start(raise: @escaping @Sendable (_ vcpu: Int, _ vector: UInt8) -> Void, threads: any ThreadControl, priority: UInt8?) throws(ThreadError) {
        running.store(true, ordering: .relaxed)
        thread = try PVSchedCore.Thread(name: "pvs-timer") { [self] in
            if let priority { try? threads.setCurrentThread(.fifo(priority: priority)) }
            while running.load(ordering: .acquiring) {
                let seen = generation.value
                let now = MonotonicClock.nowNs()
                var due: [Int] = []
                var next = UInt64.max
                deadlines.withLock { d in
                    for i in d.indices where d[i] != 0 {
                        if d[i] <= now { due.append(i); d[i] = 0 } else { next = min(next, d[i]) }
                    }
                }
                for i in due { raise(i, UInt8(PVSCHED_VECTOR_TIMER)) }
                if !due.isEmpty { continue }
                let timeout: Int64 = next == .max ? 100_000_000 : Int64(min(next - now, 100_000_000))
                generation.wait(while: seen, timeoutNs: timeout)
            }
        }
    }

    func stop() {
        running.store(false, ordering: .relaxed)
        generation.bumpAndWake(1)
        thread?.join()
        thread = nil
    }
}

/// The interrupt-response device: a device thread raises PVSCHED_VECTOR_IRQ on
/// the vCPUs running the `irq-response` workload, one event per interval (with
/// jitter so it does not phase-lock with the host), stamping the host time; the
/// guest's handler answers through PVSCHED_PORT_IRQ_ACK and the device records
/// the response latency (raise → answer) in host nanoseconds.
// @unchecked Sendable: `thread` is set by start() and cleared by stop(), which the VM calls from one thread; the rest is locked or atomic.
final class IRQResponseDevice: PortDevice, @unchecked Sendable {
    private struct Pending { var seq: UInt32 = 0; var raisedAt: UInt64 = 0; var answered = true }
    private let pending: Mutex<[Pending]>
    private let samples = Mutex<[UInt64]>([])
    private let missed = ManagedAtomic<UInt64>(0)
    private let targets: [Int]
    private let intervalNs: UInt64
    private let running = ManagedAtomic(false)
    private let sleeper = FutexWord()
    private var thread: PVSchedCore.Thread?

    init(vcpus: Int, targets: [Int], intervalNs: UInt64) {
        pending = Mutex(Array(repeating: Pending(), count: vcpus))
        self.targets = targets
        self.intervalNs = max(intervalNs, 50_000)
    }

    /// Response latencies recorded so far (ns), and events the guest never answered.
    var latencies: [UInt64] { samples.withLock { $0 } }
    var unanswered: UInt64 { missed.load(ordering: .relaxed) }

    var ports: ClosedRange<UInt16> { UInt16(PVSCHED_PORT_IRQ_ACK)...UInt16(PVSCHED_PORT_IRQ_SEQ) }
    func write(_ io: PortIO, vcpu: Int) -> PortEffect {
        if UInt32(io.port) == PVSCHED_PORT_IRQ_ACK { acknowledge(vcpu: vcpu, seq: io.value) }
        return .none
    }
    func read(port: UInt16, vcpu: Int) -> UInt32 {
        UInt32(port) == PVSCHED_PORT_IRQ_SEQ ? currentSequence(vcpu: vcpu) : 0xFFFF_FFFF
    }

    /// The sequence number of the latest event raised on `vcpu` (port IRQ_SEQ).
    func currentSequence(vcpu: Int) -> UInt32 { pending.withLock { vcpu >= 0 && vcpu < $0.count ? $0[vcpu].seq : 0 } }

    /// The guest answered event `seq` on `vcpu` (port IRQ_ACK).
    func acknowledge(vcpu: Int, seq: UInt32) {
        let now = MonotonicClock.nowNs()
        let latency: UInt64? = pending.withLock { p in
            guard vcpu >= 0, vcpu < p.count, p[vcpu].seq == seq, !p[vcpu].answered else { return nil }
            p[vcpu].answered = true
            return now > p[vcpu].raisedAt ? now - p[vcpu].raisedAt : 0
        }
        if let latency { samples.withLock { $0.append(latency) } }
    }

    /// Starts the device thread; `raise` delivers its interrupts.
    func start(raise: @escaping @Sendable (_ vcpu: Int, _ vector: UInt8) -> Void, threads: any ThreadControl, priority: UInt8?) throws(ThreadError) {
        guard !targets.isEmpty else { return }
        running.store(true, ordering: .relaxed)
        let targets = self.targets, interval = self.intervalNs
        thread = try PVSchedCore.Thread(name: "pvs-irqdev") { [self] in
            if let priority { try? threads.setCurrentThread(.fifo(priority: priority)) }
            var rng: UInt64 = 0x2545_F491_4F6C_DD1D
            var next = MonotonicClock.nowNs() &+ interval
            var k = 0
            while running.load(ordering: .acquiring) {
                let now = MonotonicClock.nowNs()
                if now < next {
                    sleeper.wait(while: sleeper.value, timeoutNs: Int64(next - now))
                    continue
                }
                let vcpu = targets[k % targets.count]
                k += 1
                let raisedAt = MonotonicClock.nowNs()
                let wasAnswered = pending.withLock { p -> Bool in
                    let answered = p[vcpu].answered
                    p[vcpu].seq &+= 1
                    p[vcpu].raisedAt = raisedAt
                    p[vcpu].answered = false
                    return answered
                }
                if !wasAnswered { missed.wrappingIncrement(ordering: .relaxed) }
                raise(vcpu, UInt8(PVSCHED_VECTOR_IRQ))
                rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
                next = raisedAt &+ interval / UInt64(targets.count) + rng % (interval / 2 + 1)
            }
        }
    }

    func stop() {
        running.store(false, ordering: .relaxed)
        sleeper.bumpAndWake()
        thread?.join()
        thread = nil
    }
}
