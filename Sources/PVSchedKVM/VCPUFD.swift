import Atomics
import CKVM
import SystemPackage

/// A vCPU file descriptor and its mapped `kvm_run`: registers, CPUID, MP state,
/// interrupt injection and `KVM_RUN`. Every call except `requestImmediateExit`
/// belongs on the vCPU's own thread.
// @unchecked Sendable: shared only for `requestImmediateExit` (one byte of kvm_run KVM reads at entry); the rest runs on the vCPU thread.
public final class VCPUFD: @unchecked Sendable {
    private let fd: FileDescriptor
    public let id: Int
    let runArea: UnsafeMutablePointer<kvm_run>
    private let runSize: Int

    init(fd: FileDescriptor, id: Int, run: UnsafeMutableRawPointer, runSize: Int) {
        self.fd = fd; self.id = id; self.runSize = runSize
        self.runArea = run.assumingMemoryBound(to: kvm_run.self)
    }

    deinit {
        _ = ckvm_munmap(runArea, runSize)
        try? fd.close()
    }

    public func getRegs() throws(KVMError) -> kvm_regs { try get(CKVM_GET_REGS, "KVM_GET_REGS", kvm_regs()) }
    public func setRegs(_ regs: kvm_regs) throws(KVMError) { try set(CKVM_SET_REGS, "KVM_SET_REGS", regs) }
    public func getSregs() throws(KVMError) -> kvm_sregs { try get(CKVM_GET_SREGS, "KVM_GET_SREGS", kvm_sregs()) }
    public func setSregs(_ sregs: kvm_sregs) throws(KVMError) { try set(CKVM_SET_SREGS, "KVM_SET_SREGS", sregs) }

    private func get<T>(_ request: UInt, _ name: String, _ initial: T) throws(KVMError) -> T {
        var value = initial
        _ = try check(ckvm_ioctl(fd.rawValue, request, &value), name)
        return value
    }
    private func set<T>(_ request: UInt, _ name: String, _ value: T) throws(KVMError) {
        var v = value
        _ = try check(ckvm_ioctl(fd.rawValue, request, &v), name)
    }
    public func setCPUID(_ entries: CPUIDEntries) throws(KVMError) {
        _ = try check(ckvm_ioctl(fd.rawValue, CKVM_SET_CPUID2, entries.raw), "KVM_SET_CPUID2")
    }
    /// Makes the vCPU runnable (vCPUs after the first start in INIT_RECEIVED with an irqchip).
    public func setRunnable() throws(KVMError) {
        var s = kvm_mp_state(mp_state: UInt32(KVM_MP_STATE_RUNNABLE))
        _ = try check(ckvm_ioctl(fd.rawValue, CKVM_SET_MP_STATE, &s), "KVM_SET_MP_STATE")
    }
    /// Sets XCR0 (which state components XSAVE manages and the guest may use).
    public func setXCR0(_ value: UInt64) throws(KVMError) {
        _ = try check(ckvm_set_xcr0(fd.rawValue, value), "KVM_SET_XCRS")
    }
    /// The guest TSC frequency in kHz.
    public func tscKHz() throws(KVMError) -> UInt64 {
        UInt64(try check(ckvm_ioctl_value(fd.rawValue, CKVM_GET_TSC_KHZ, 0), "KVM_GET_TSC_KHZ"))
    }
    /// Queues an external interrupt (userspace irqchip; only when `readyForInterrupt`).
    public func interrupt(vector: UInt8) throws(KVMError) {
        var irq = kvm_interrupt(irq: UInt32(vector))
        _ = try check(ckvm_ioctl(fd.rawValue, CKVM_INTERRUPT, &irq), "KVM_INTERRUPT")
    }

    /// Whether the guest can take an injected interrupt now.
    public var readyForInterrupt: Bool { runArea.pointee.ready_for_interrupt_injection != 0 && runArea.pointee.if_flag != 0 }
    /// Ask KVM to exit as soon as the guest can take an interrupt.
    public var requestInterruptWindow: Bool {
        get { runArea.pointee.request_interrupt_window != 0 }
        set { runArea.pointee.request_interrupt_window = newValue ? 1 : 0 }
    }

    /// Makes the current or next KVM_RUN return at once (safe from any thread).
    public func requestImmediateExit(_ on: Bool) {
        let p = UnsafeMutableRawPointer(runArea) + MemoryLayout<kvm_run>.offset(of: \kvm_run.immediate_exit)!
        UnsafeAtomic<UInt8>(at: p.assumingMemoryBound(to: UInt8.AtomicRepresentation.self))
            .store(on ? 1 : 0, ordering: .releasing)
    }

    /// Runs the vCPU until the next exit and decodes it.
    /// Answers the port read of the last exit with `value` (first element); KVM
    /// hands it to the guest at the next KVM_RUN.
    public func completeRead(_ value: UInt32) {
        let run = runArea
        let io = run.pointee.io
        guard Int32(run.pointee.exit_reason) == KVM_EXIT_IO, io.direction != UInt8(KVM_EXIT_IO_OUT),
              let data = ckvm_io_data(run) else { return }
        for i in 0..<min(Int(io.size), 4) { data[i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }

    /// Resets the x87/SSE state to its power-on values.
    public func resetFPU() { _ = ckvm_reset_fpu(fd.rawValue) }

    public func run() throws(KVMError) -> VMExit {
        let r = ckvm_ioctl(fd.rawValue, CKVM_RUN, nil)
        if r == -Int(Errno.interrupted.rawValue) { return .interrupted }
        _ = try check(r, "KVM_RUN on vCPU \(id)")
        return VMExit(runArea)
    }
}
