import CLinuxSched

#if canImport(Glibc)
import Glibc
#endif

/// Why a shared-memory file could not be mapped; `field` names the request field.
public struct SharedMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    public let field: String
    public let message: String
    public init(field: String, _ message: String) { self.field = field; self.message = message }
    public var description: String { "\(field): \(message)" }
}

/// A read-write shared mapping of part of a file under /dev/shm (an attached
/// VM's guest memory, or the ivshmem region its guest writes the pvsched area
/// into): the owner that keeps a `SharedArea` valid.
///
/// The file is opened as `SafeOpen` does (no symbolic link, a regular file owned by
/// root or the VMM's user, not writable by others) and, with a VMM given, must be
/// one that process maps. Whoever can write the file can also truncate it under
/// the daemon: a read past its new end would raise SIGBUS. The mapping is
/// registered with the region guard (`pvs_region_guard_add`), which turns such a
/// fault into zeros and `faulted`; the owner then disables the VM with the reason.
public final class SharedMemoryFile: @unchecked Sendable {
    // @unchecked Sendable: the mapping is fixed for the object's life; the guest
    // writes it concurrently by design and every reader goes through the seqlock
    // or atomics.
    private let base: UnsafeMutableRawPointer
    private let length: Int
    /// Where the requested bytes start inside the mapping (offset rounded to pages).
    private let skew: Int
    public let path: String

    /// Maps `length` bytes at `offset` of `path` (the whole file when `length` is nil).
    /// The path must lie under /dev/shm/, or, with `vmm` given, under the VMM's own
    /// /dev/shm as /proc shows it (`/proc/VMM/root/dev/shm/`: a VMM in a container,
    /// such as KubeVirt's virt-launcher); `vmm`, when given, is the process that
    /// must map the same file (and whose user may own it).
    public init(path: String, offset: Int = 0, length: Int? = nil, vmm: Int32? = nil) throws(SharedMemoryError) {
        self.path = path
        var owner: SafeOpen.Owner?
        if let vmm {
            guard let o = SafeOpen.Owner.process(vmm) else { throw SharedMemoryError(field: "memory", "process \(vmm) is gone") }
            owner = o
        }
        let opened: (fd: Int32, stat: stat)
        do throws(SafeOpenError) {
            let containerShm = vmm.map { "/proc/\($0)/root/dev/shm" }
            let under = containerShm.map { path.hasPrefix($0 + "/") ? $0 : "/dev/shm" } ?? "/dev/shm"
            opened = try SafeOpen.regularFile(path, under: under, flags: O_RDWR, owner: owner, field: "memory")
        } catch {
            throw SharedMemoryError(field: "memory", error.message)
        }
        let fd = opened.fd
        defer { close(fd) }
        if let vmm, !SafeOpen.isMapped(opened.stat, by: vmm) {
            throw SharedMemoryError(field: "memory", "\(path) is not mapped by process \(vmm): not that VM's memory")
        }
        let size = Int(opened.stat.st_size)
        let length = length ?? (size - offset)
        guard offset >= 0, length > 0 else {
            throw SharedMemoryError(field: "areaOffset", "\(path) (\(size) bytes) has nothing at offset \(offset)")
        }
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= size else {
            throw SharedMemoryError(field: "areaOffset", "the area (\(offset) + \(length) bytes) does not lie inside \(path) (\(size) bytes)")
        }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let aligned = offset / page * page
        skew = offset - aligned
        self.length = skew + length
        guard let p = mmap(nil, self.length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(aligned)), p != MAP_FAILED else {
            throw SharedMemoryError(field: "memory", "mmap \(path): \(String(cString: strerror(errno)))")
        }
        guard pvs_region_guard_add(p, self.length) == 0 else {
            munmap(p, self.length)
            throw SharedMemoryError(field: "memory", "too many shared regions mapped (\(PVS_REGION_SLOTS))")
        }
        base = p
    }

    /// The requested bytes.
    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base + skew, count: length - skew) }

    /// Whether the file was truncated under the mapping (a read faulted): the
    /// region now reads as zeros and means nothing.
    public var faulted: Bool { pvs_region_guard_faulted(base) != 0 }

    deinit {
        pvs_region_guard_remove(base)
        munmap(base, length)
    }
}
