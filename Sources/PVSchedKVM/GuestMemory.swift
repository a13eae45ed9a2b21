import CKVM

#if canImport(Glibc)
import Glibc
#endif

/// Guest RAM: one mapping shown to the guest at guest-physical 0 (anonymous, or
/// a shared file that another process, the pvsched daemon, can map too).
/// Every access from the host is bounds-checked: addresses come from the guest.
// @unchecked Sendable: `base` is fixed for the object's life; the guest writes the
// memory concurrently by design, and host readers use atomics or copy out.
public final class GuestMemory: @unchecked Sendable {
    public let size: Int
    public let base: UnsafeMutableRawPointer
    /// The file backing the memory, when shared.
    public let sharedFile: String?

    public init(size: Int) throws(KVMError) {
        guard let p = ckvm_mmap_anonymous(size) else { throw KVMError("mmap guest memory (\(size) bytes)", errno: .current) }
        self.size = size
        self.base = p
        self.sharedFile = nil
    }

    /// Guest RAM in a new shared file at `path` (created 0600, replacing one left over).
    public init(size: Int, sharedFile path: String) throws(KVMError) {
        unlink(path)
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw KVMError("create guest memory file \(path)", errno: .current) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw KVMError("size guest memory file \(path)", errno: .current) }
        guard let p = ckvm_mmap_shared(fd, size) else { throw KVMError("mmap guest memory file \(path)", errno: .current) }
        self.size = size
        self.base = p
        self.sharedFile = path
    }

    deinit {
        _ = ckvm_munmap(base, size)
        if let sharedFile { unlink(sharedFile) }
    }

    /// Whether [gpa, gpa+length) lies inside guest RAM.
    public func contains(_ gpa: UInt64, length: Int) -> Bool {
        guard length >= 0 else { return false }
        let (end, overflow) = gpa.addingReportingOverflow(UInt64(length))
        return !overflow && end <= UInt64(size)
    }

    /// A host pointer to [gpa, gpa+length), or nil if it is not all guest RAM.
    public func bytes(at gpa: UInt64, length: Int) -> UnsafeMutableRawBufferPointer? {
        guard contains(gpa, length: length) else { return nil }
        return UnsafeMutableRawBufferPointer(start: base + Int(gpa), count: length)
    }

    /// Copies `data` to guest-physical `gpa`.
    public func write(_ data: some Collection<UInt8>, at gpa: UInt64) throws(KVMError) {
        guard let dst = bytes(at: gpa, length: data.count) else {
            throw KVMError("load into guest memory", detail: "\(data.count) bytes at 0x\(String(gpa, radix: 16)) do not fit in \(size) bytes of RAM")
        }
        dst.copyBytes(from: data)
    }

    /// A typed pointer at `gpa` (host-owned structures such as page tables and boot info).
    public func pointer<T>(to: T.Type, at gpa: UInt64) -> UnsafeMutablePointer<T>? {
        bytes(at: gpa, length: MemoryLayout<T>.size).map { $0.baseAddress!.assumingMemoryBound(to: T.self) }
    }
}
