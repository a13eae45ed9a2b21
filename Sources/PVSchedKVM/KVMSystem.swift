import Synchronization
import CKVM
import SystemPackage

/// The KVM system file descriptor (/dev/kvm): capabilities, supported CPUID,
/// and creating VMs. A thin typed wrapper in the style of rust-vmm's `Kvm`.
public final class KVMSystem: Sendable {
    private let fd: FileDescriptor
    public static let devicePath = "/dev/kvm"

    /// Opens /dev/kvm and checks the API version is 12.
    public init() throws(KVMError) {
        do {
            fd = try FileDescriptor.open(Self.devicePath, .readWrite, options: [.closeOnExec])
        } catch {
            throw KVMError("open \(Self.devicePath)", errno: error as? Errno)
        }
        let v = ckvm_ioctl_value(fd.rawValue, CKVM_GET_API_VERSION, 0)
        guard v == 12 else { throw KVMError("KVM_GET_API_VERSION", detail: "version \(v), expected 12") }
    }

    deinit { try? fd.close() }

    /// Whether /dev/kvm can be opened by this process (for skipping tests with a reason).
    public static var isAvailable: Bool { (try? KVMSystem()) != nil }

    public func checkExtension(_ cap: Int32) -> Int {
        Int(ckvm_ioctl_value(fd.rawValue, CKVM_CHECK_EXTENSION, UInt(cap)))
    }

    public func vcpuMmapSize() throws(KVMError) -> Int {
        try check(ckvm_ioctl_value(fd.rawValue, CKVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE")
    }

    /// The CPUID entries KVM supports, to pass on to each vCPU unchanged.
    public func supportedCPUID() throws(KVMError) -> CPUIDEntries {
        let c = CPUIDEntries(capacity: 256)
        _ = try check(ckvm_ioctl(fd.rawValue, CKVM_GET_SUPPORTED_CPUID, c.raw), "KVM_GET_SUPPORTED_CPUID")
        return c
    }

    /// Creates a VM.
    public func createVM() throws(KVMError) -> VMFD {
        let r = try check(ckvm_ioctl_value(fd.rawValue, CKVM_CREATE_VM, 0), "KVM_CREATE_VM")
        return VMFD(fd: FileDescriptor(rawValue: Int32(r)), system: self)
    }
}

/// A kvm_cpuid2 list owned by Swift.
// @unchecked Sendable: the list is written once when made and only read afterwards.
public final class CPUIDEntries: @unchecked Sendable {
    let raw: UnsafeMutablePointer<kvm_cpuid2>
    init(capacity: UInt32) { raw = ckvm_alloc_cpuid(capacity) }
    deinit { ckvm_free(raw) }
    public var count: Int { Int(raw.pointee.nent) }
}

/// A VM file descriptor: memory slots, vCPUs, the in-kernel irqchip, MSIs.
public final class VMFD: Sendable {
    private let fd: FileDescriptor
    public let system: KVMSystem

    /// Memory mapped into the guest, kept alive as long as the VM fd.
    private let regions = Mutex<[GuestMemory]>([])

    init(fd: FileDescriptor, system: KVMSystem) { self.fd = fd; self.system = system }
    deinit { try? fd.close() }

    /// Maps `size` bytes at `host` to guest-physical `guestPhysical` in `slot`.
    /// Maps all of `memory` into the guest at `guestPhysical`. The VM keeps the
    /// memory alive: KVM holds its address until the VM fd is closed.
    public func setUserMemoryRegion(slot: UInt32, guestPhysical: UInt64, memory: GuestMemory) throws(KVMError) {
        var region = kvm_userspace_memory_region(slot: slot, flags: 0, guest_phys_addr: guestPhysical,
                                                 memory_size: UInt64(memory.size), userspace_addr: UInt64(UInt(bitPattern: memory.base)))
        _ = try check(ckvm_ioctl(fd.rawValue, CKVM_SET_USER_MEMORY_REGION, &region), "KVM_SET_USER_MEMORY_REGION")
        regions.withLock { $0.append(memory) }
    }

    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        _ = try check(ckvm_ioctl_value(fd.rawValue, CKVM_SET_TSS_ADDR, UInt(address)), "KVM_SET_TSS_ADDR")
    }

    /// Creates the in-kernel PIC, IOAPIC and a LAPIC per vCPU (create before vCPUs).
    public func createIRQChip() throws(KVMError) {
        _ = try check(ckvm_ioctl_value(fd.rawValue, CKVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP")
    }

    /// Sends an MSI to the LAPIC of `apicID` with `vector` (fixed delivery, edge).
    public func signalMSI(apicID: UInt32, vector: UInt8) throws(KVMError) {
        var msi = kvm_msi()
        msi.address_lo = 0xFEE0_0000 | (apicID << 12)
        msi.address_hi = 0
        msi.data = UInt32(vector)
        _ = try check(ckvm_ioctl(fd.rawValue, CKVM_SIGNAL_MSI, &msi), "KVM_SIGNAL_MSI")
    }

    public func createVCPU(id: Int) throws(KVMError) -> VCPUFD {
        let r = try check(ckvm_ioctl_value(fd.rawValue, CKVM_CREATE_VCPU, UInt(id)), "KVM_CREATE_VCPU \(id)")
        let vfd = FileDescriptor(rawValue: Int32(r))
        let size = try system.vcpuMmapSize()
        guard let run = ckvm_mmap_shared(vfd.rawValue, size) else {
            try? vfd.close()
            throw KVMError("mmap kvm_run of vCPU \(id)", errno: .current)
        }
        return VCPUFD(fd: vfd, id: id, run: run, runSize: size)
    }
}

extension Errno {
    static var current: Errno {
        #if canImport(Glibc)
        return Errno(rawValue: Glibc.errno)
        #else
        return Errno(rawValue: 0)
        #endif
    }
}

#if canImport(Glibc)
import Glibc
#endif
