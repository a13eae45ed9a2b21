import Atomics
import CKVM
import Logging
import PVSchedABI
import PVSchedCore
import Synchronization

/// How a VM run ended.
public enum VMOutcome: Equatable, Sendable, CustomStringConvertible {
    /// The guest wrote its exit code to the exit port.
    case exited(code: UInt32)
    /// The host stopped it (`stop()` or a timeout).
    case stopped
    /// A vCPU hit an exit the VMM cannot continue from.
    case failed(vcpu: Int, failure: VMFailure)

    public var description: String {
        switch self {
        case .exited(let code): return "exited(code: \(code))"
        case .stopped: return "stopped"
        case .failed(let vcpu, let failure): return "failed on vCPU \(vcpu): \(failure)"
        }
    }
}

/// Why a vCPU could not go on, as a typed record (the registers where the guest was, if read).
public enum VMFailure: Equatable, Sendable, CustomStringConvertible {
    /// The guest shut down (a triple fault).
    case shutdown(registers: RegisterDump?)
    /// KVM reported an internal error (under PVM, often an instruction its emulator cannot run).
    case internalError(suberror: UInt32, registers: RegisterDump?)
    /// Entering the guest failed (hardware reason code).
    case failEntry(reason: UInt64)
    /// The guest touched memory-mapped I/O outside RAM; this VMM has no MMIO devices.
    case mmioOutsideRAM(address: UInt64, write: Bool)
    /// An exit reason the VMM does not handle.
    case unhandled(reason: UInt32)
    /// The KVM_RUN ioctl itself failed.
    case kvm(String)

    public var description: String {
        switch self {
        case .shutdown(let r): return "guest shutdown (triple fault)\(r.map { " at \($0)" } ?? "")"
        case .internalError(let sub, let r): return "KVM internal error, suberror \(sub)\(r.map { " at \($0)" } ?? "")"
        case .failEntry(let reason): return "VM entry failed, reason 0x\(String(reason, radix: 16))"
        case .mmioOutsideRAM(let a, let w): return "MMIO \(w ? "write" : "read") at 0x\(String(a, radix: 16)) outside RAM"
        case .unhandled(let r): return "unhandled exit reason \(r)"
        case .kvm(let e): return "KVM_RUN failed: \(e)"
        }
    }
}

/// The registers of a vCPU that failed, for the report.
public struct RegisterDump: Equatable, Sendable, CustomStringConvertible {
    public var rip: UInt64, rsp: UInt64
    public var cr0: UInt64?, cr4: UInt64?, efer: UInt64?
    public var description: String {
        var text = "rip 0x\(String(rip, radix: 16)), rsp 0x\(String(rsp, radix: 16))"
        if let cr0, let cr4, let efer {
            text += ", cr0 0x\(String(cr0, radix: 16)), cr4 0x\(String(cr4, radix: 16)), efer 0x\(String(efer, radix: 16))"
        }
        return text
    }
}

/// A running guest on /dev/kvm: guest memory in long mode, N vCPUs each on its
/// own OS thread with one exit loop, a console, a timer, interrupt delivery,
/// and the pvsched device through which the guest registers its shared area.
/// Every vCPU event goes out through the host link's narrow event sink; the VMM
/// knows nothing of drivers, registries, governors or actuators.
// @unchecked Sendable: the mutable thread lists are touched only by start()/stop(),
// which the owner calls from one thread; everything else is immutable or locked.
public final class VirtualMachine: @unchecked Sendable {
    public let config: VMConfiguration
    public let handle: VMHandle
    public let memory: GuestMemory
    /// The host component's side of this VM (nil runs without pvsched).
    public let host: VMHostLink?
    /// Where vCPU events go (the host link's sink).
    var events: (any VMEventSink)? { host?.events }
    let threadControl: any ThreadControl
    let kvm: KVMSystem
    let vm: VMFD
    let vcpus: [VCPUContext]
    let logger: Logger
    public let tscKHz: UInt64

    let console: Console
    let pvschedDevice: PVSchedDevice
    let timer: TimerDevice
    let irqDevice: IRQResponseDevice
    /// Every exit goes through it: devices on the port bus, then the driver events.
    let exitHandler: ExitHandler
    private let stopping = ManagedAtomic(false)
    private let outcomeLock = Mutex<VMOutcome?>(nil)
    private let finished = FutexWord()
    private var threads: [PVSchedCore.Thread] = []
    private static let nextID = ManagedAtomic<UInt64>(1)

    /// The largest vCPU count the VMM supports.
    public static let maxVCPUs = 16

    /// Creates the VM (memory, page tables, boot info, vCPUs), sending its events
    /// through `host` (nil runs it without pvsched). Nothing runs until `start()`.
    public init(config: VMConfiguration, host: VMHostLink?, threads: any ThreadControl,
                logger: Logger = Logger(label: "pvsched.vmm")) throws {
        guard config.vcpus >= 1 && config.vcpus <= Self.maxVCPUs else {
            throw KVMError("create VM", detail: "vcpus must be 1...\(Self.maxVCPUs), got \(config.vcpus)")
        }
        if let host, host.handle.vcpuCount != config.vcpus {
            throw KVMError("create VM", detail: "host link is for \(host.handle.vcpuCount) vCPUs, the configuration has \(config.vcpus)")
        }
        self.config = config
        self.logger = logger
        self.host = host
        self.threadControl = threads
        handle = host?.handle ?? VMHandle(id: Self.nextID.loadThenWrappingIncrement(ordering: .relaxed) | 1 << 63,
                                          name: config.name, vcpuCount: config.vcpus)
        kvm = try KVMSystem()
        vm = try kvm.createVM()
        try vm.setTSSAddress(0xfffb_d000)
        if config.interrupts == .inKernelIRQChip { try vm.createIRQChip() }
        memory = try config.memoryFile.map { path throws(KVMError) in try GuestMemory(size: config.memorySize, sharedFile: path) }
            ?? GuestMemory(size: config.memorySize)
        try vm.setUserMemoryRegion(slot: 0, guestPhysical: 0, memory: memory)
        try LongMode.writeTables(into: memory)
        try memory.write(config.image, at: UInt64(PVSCHED_GPA_KERNEL))

        let cpuid = try kvm.supportedCPUID()
        var contexts: [VCPUContext] = []
        var khz: UInt64 = 0
        for i in 0..<config.vcpus {
            let fd = try vm.createVCPU(id: i)
            try fd.setCPUID(cpuid)
            var sregs = try fd.getSregs()
            LongMode.configure(&sregs)
            try fd.setSregs(sregs)
            try fd.setXCR0(0x3)  // x87 + SSE state, matching CR4.OSXSAVE
            fd.resetFPU()
            var regs = kvm_regs()
            regs.rip = UInt64(PVSCHED_GPA_KERNEL)
            regs.rsp = UInt64(config.memorySize) - UInt64(i) * UInt64(PVSCHED_BOOT_STACK_SIZE) - 8
            regs.rdi = UInt64(i)
            regs.rsi = UInt64(PVSCHED_GPA_BOOT_INFO)
            regs.rflags = 2
            try fd.setRegs(regs)
            if config.interrupts == .inKernelIRQChip { try fd.setRunnable() }
            if i == 0 { khz = (try? fd.tscKHz()) ?? 0 }
            contexts.append(VCPUContext(index: i, fd: fd))
        }
        vcpus = contexts
        tscKHz = khz
        try Self.writeBootInfo(config: config, memory: memory, tscKHz: khz)

        pvschedDevice = PVSchedDevice(vcpus: config.vcpus, memory: memory, registrar: host?.registrar,
                                      vmName: "\(handle)", logger: logger)
        console = Console(vcpus: config.vcpus, sink: config.consoleLine)
        timer = TimerDevice(vcpus: config.vcpus)
        let irqTargets = (0..<config.vcpus).filter { i in
            (i < config.boot.perVCPU.count ? config.boot.perVCPU[i] : nil) ?? config.boot.workload == .irqResponse
        }
        irqDevice = IRQResponseDevice(vcpus: config.vcpus, targets: irqTargets, intervalNs: config.boot.intervalNs)
        exitHandler = ExitHandler(bus: PortBus([console, ExitPort(), timer, irqDevice, pvschedDevice]), events: host?.events)
        ckvm_install_kick_handler()
    }

    deinit { stop() }

    private static func writeBootInfo(config: VMConfiguration, memory: GuestMemory, tscKHz: UInt64) throws(KVMError) {
        guard let info = memory.pointer(to: pvsched_boot_info.self, at: UInt64(PVSCHED_GPA_BOOT_INFO)) else {
            throw KVMError("write boot info", detail: "guest memory too small")
        }
        var b = pvsched_boot_info()
        b.magic = PVSCHED_BOOT_MAGIC
        b.vcpu_count = UInt32(config.vcpus)
        b.memory_size = UInt64(config.memorySize)
        b.tsc_khz = tscKHz
        b.workload = config.boot.workload.rawValue
        b.arg = config.boot.arg
        b.interval_ns = config.boot.intervalNs
        b.duration_ns = config.boot.durationNs
        b.pvsched_enabled = config.boot.pvschedEnabled ? 1 : 0
        b.irqchip = config.interrupts == .inKernelIRQChip ? 1 : 0
        withUnsafeMutableBytes(of: &b.vcpu_workload) { w in
            for i in 0..<w.count {
                w[i] = i < config.boot.perVCPU.count ? (config.boot.perVCPU[i].map { UInt8($0.rawValue) } ?? 0xFF) : 0xFF
            }
        }
        info.pointee = b
    }

    // MARK: lifecycle

    /// Starts every vCPU thread and the devices' threads (the host enforces the VM's
    /// budgets; the VMM knows nothing of them). When a thread cannot be started, what
    /// did start is stopped again and the VM ends.
    public func start() throws(ThreadError) {
        do throws(ThreadError) { try startThreads() } catch {
            stop()
            throw error
        }
    }

    private func startThreads() throws(ThreadError) {
        let raise: @Sendable (Int, UInt8) -> Void = { [weak self] vcpu, vector in self?.raiseInterrupt(vcpu: vcpu, vector: vector) }
        try timer.start(raise: raise, threads: threadControl, priority: config.deviceThreadPriority)
        try irqDevice.start(raise: raise, threads: threadControl, priority: config.deviceThreadPriority)
        for ctx in vcpus {
            threads.append(try PVSchedCore.Thread(name: "vcpu\(ctx.index)") { [self] in runLoop(ctx) })
        }
    }

    /// Waits until the VM ends or `timeoutNs` passes (then stops it).
    @discardableResult
    public func wait(timeoutNs: UInt64) -> VMOutcome {
        let (sum, overflow) = MonotonicClock.nowNs().addingReportingOverflow(timeoutNs)
        let deadline = overflow ? UInt64.max : sum
        while finished.value == 0 {
            let now = MonotonicClock.nowNs()
            if now >= deadline { break }
            finished.wait(while: 0, timeoutNs: Int64(min(deadline - now, 100_000_000)))
        }
        stop()
        return outcomeLock.withLock { $0 } ?? .stopped
    }

    /// Serialises stop() (an owner and a monitor thread may both call it).
    private let stopLock = Mutex(())

    /// Stops every vCPU, joins the threads and undoes every boost (idempotent,
    /// safe from several threads).
    public func stop() {
        stopLock.withLock { _ in stopLocked() }
    }

    private func stopLocked() {
        finish(.stopped)
        for ctx in vcpus { kick(ctx) }
        timer.stop()
        irqDevice.stop()
        for t in threads { t.join() }
        threads.removeAll()
        host?.release()
    }

    /// Everything the guest printed so far.
    public var consoleOutput: String { console.output }

    /// How the VM ended (nil while running).
    public var outcome: VMOutcome? { outcomeLock.withLock { $0 } }

    /// Interrupt-response latencies (raise → guest answer) in ns, and events never answered.
    public var irqResponseLatencies: [UInt64] { irqDevice.latencies }
    public var irqResponseUnanswered: UInt64 { irqDevice.unanswered }

    /// Exits handled by each vCPU.
    public var exitCounts: [UInt64] { vcpus.map { $0.exits.load(ordering: .relaxed) } }
    /// Interrupts the VMM's devices raised for each vCPU.
    public var injectionCounts: [UInt64] { vcpus.map { $0.injections.load(ordering: .relaxed) } }
    /// The OS thread of each vCPU (0 before it starts or after it ends).
    public var vcpuThreads: [Int32] { vcpus.map { $0.thread.load(ordering: .relaxed) } }

    func finish(_ outcome: VMOutcome) {
        let first = outcomeLock.withLock { o -> Bool in
            if o == nil { o = outcome; return true }
            return false
        }
        stopping.store(true, ordering: .releasing)
        if first {
            finished.bumpAndWake()
            for ctx in vcpus { kick(ctx) }
        }
    }

    // MARK: interrupts

    /// Delivers interrupt `vector` to vCPU `vcpu`: notifies the driver first (so a
    /// boost is in place before the vCPU thread wakes), then queues and wakes.
    /// Safe from any thread; this is what device threads call.
    public func raiseInterrupt(vcpu: Int, vector: UInt8) {
        let ctx = vcpus[vcpu]
        ctx.injections.wrappingIncrement(ordering: .relaxed)
        events?.notify(.interruptInjection(vector: vector), vcpu: vcpu)
        switch config.interrupts {
        case .inKernelIRQChip:
            do { try vm.signalMSI(apicID: UInt32(vcpu), vector: vector) } catch {
                logger.error("MSI failed", metadata: ["error": "\(error)"])
            }
        case .userspace:
            // Like an interrupt controller's request register: a vector already
            // pending is not queued twice (edge interrupts coalesce).
            ctx.pending.withLock { if !$0.contains(vector) { $0.append(vector) } }
            kick(ctx)
        }
    }

    /// Makes vCPU `ctx` leave KVM_RUN (or its halt wait) soon.
    func kick(_ ctx: VCPUContext) {
        ctx.wakeups.bumpAndWake(1)
        // Pairs with the fence in runLoop: either this sees the thread in the guest and
        // interrupts it, or the thread sees this bump before entering and does not wait.
        Atomics.atomicMemoryFence(ordering: .sequentiallyConsistent)
        if ctx.state.load(ordering: .acquiring) == .inGuest {
            ctx.fd.requestImmediateExit(true)
            let tid = ctx.thread.load(ordering: .relaxed)
            if tid != 0 { _ = ckvm_kick_thread(tid) }
        }
    }

    // MARK: the vCPU loop

    private func runLoop(_ ctx: VCPUContext) {
        _ = ckvm_unblock_kick_signal()
        let tid = threadControl.currentThread().rawValue
        ctx.thread.store(tid, ordering: .relaxed)
        if let masks = config.vcpuAffinity, ctx.index < masks.count {
            try? threadControl.setAffinity(ThreadID(tid), mask: masks[ctx.index])
        }
        events?.setThread(ThreadID(tid), vcpu: ctx.index)
        defer {
            events?.setThread(nil, vcpu: ctx.index)
            ctx.thread.store(0, ordering: .relaxed)
        }
        let fd = ctx.fd
        defer { ctx.state.store(.stopped, ordering: .releasing) }
        while !stopping.load(ordering: .acquiring) {
            ctx.state.store(.entering, ordering: .releasing)
            let kicks = ctx.wakeups.value
            let queued = config.interrupts == .userspace ? injectPending(ctx) : false
            events?.notify(.vmEntry, vcpu: ctx.index, interruptStillQueued: queued)
            ctx.state.store(.inGuest, ordering: .releasing)
            // An interrupt raised since the injection above found the thread not yet in
            // the guest, so nothing interrupts KVM_RUN for it: enter with an immediate
            // exit and inject it next round. (Lost, it stayed queued until the guest's
            // next exit, which a guest running batch work may not make for seconds.)
            Atomics.atomicMemoryFence(ordering: .sequentiallyConsistent)
            if ctx.wakeups.value != kicks { fd.requestImmediateExit(true) }
            let exit: VMExit
            do {
                exit = try fd.run()
            } catch {
                ctx.state.store(.handlingExit, ordering: .releasing)
                finish(.failed(vcpu: ctx.index, failure: .kvm("\(error)")))
                break
            }
            ctx.state.store(.handlingExit, ordering: .releasing)
            ctx.exits.wrappingIncrement(ordering: .relaxed)
            if case .interrupted = exit { fd.requestImmediateExit(false) }
            let (action, reply) = exitHandler.handle(exit, vcpu: ctx.index) { registerDump(fd) }
            if let reply { fd.completeRead(reply) }
            switch action {
            case .resume: continue
            case .waitForInterrupt:
                ctx.state.store(.waitingForInterrupt, ordering: .releasing)
                waitForInterrupt(ctx)
            case .finish(let outcome):
                finish(outcome)
            }
        }
    }

    private func registerDump(_ fd: VCPUFD) -> RegisterDump? {
        guard let r = try? fd.getRegs() else { return nil }
        let s = try? fd.getSregs()
        return RegisterDump(rip: r.rip, rsp: r.rsp, cr0: s?.cr0, cr4: s?.cr4, efer: s?.efer)
    }

    /// Injects the next queued interrupt if the guest can take it, and asks for an
    /// interrupt window otherwise. Returns whether interrupts remain queued.
    private func injectPending(_ ctx: VCPUContext) -> Bool {
        let fd = ctx.fd
        let ready = fd.readyForInterrupt
        let (vector, remaining) = ctx.pending.withLock { q -> (UInt8?, Bool) in
            guard !q.isEmpty, ready else { return (nil, !q.isEmpty) }
            let v = q.removeFirst()
            return (v, !q.isEmpty)
        }
        if let vector {
            do { try fd.interrupt(vector: vector) } catch {
                logger.error("inject failed", metadata: ["vcpu": "\(ctx.index)", "error": "\(error)"])
            }
        }
        if fd.requestInterruptWindow != remaining { fd.requestInterruptWindow = remaining }
        return remaining
    }

    /// A halted vCPU (userspace irqchip) sleeps until an interrupt is queued or the VM stops.
    private func waitForInterrupt(_ ctx: VCPUContext) {
        while !stopping.load(ordering: .acquiring) {
            let seen = ctx.wakeups.value
            if ctx.pending.withLock({ !$0.isEmpty }) { return }
            ctx.wakeups.wait(while: seen, timeoutNs: -1)
        }
    }
}

/// Where a vCPU thread is in its loop (Firecracker names the same states).
enum VCPULoopState: UInt8, AtomicValue {
    /// Not started yet.
    case starting
    /// Injecting queued interrupts and notifying `vmEntry`.
    case entering
    /// In KVM_RUN: a kick must interrupt it.
    case inGuest
    /// Back from KVM_RUN, running the exit handler.
    case handlingExit
    /// Halted, sleeping until an interrupt is queued (userspace irqchip).
    case waitingForInterrupt
    /// The loop ended.
    case stopped
}

/// Per-vCPU state of the VMM: the fd, its thread, queued interrupts.
// @unchecked Sendable: every mutable field is an atomic or a Mutex; `fd` is used as VCPUFD allows.
final class VCPUContext: @unchecked Sendable {
    let index: Int
    let fd: VCPUFD
    let thread = ManagedAtomic<Int32>(0)
    let state = ManagedAtomic(VCPULoopState.starting)
    let exits = ManagedAtomic<UInt64>(0)
    let injections = ManagedAtomic<UInt64>(0)
    let pending = Mutex<[UInt8]>([])
    /// Bumped on every wake-up request; the futex word a halted vCPU sleeps on.
    let wakeups = FutexWord()

    init(index: Int, fd: VCPUFD) { self.index = index; self.fd = fd }
}

