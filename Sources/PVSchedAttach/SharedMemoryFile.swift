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
    /// The path must lie under /dev/shm/ and is opened without following links.
    public init(path: String, offset: Int = 0, length: Int? = nil) throws(SharedMemoryError) {
        guard path.hasPrefix("/dev/shm/"), !path.contains("/../"), !path.hasSuffix("/..") else {
            throw SharedMemoryError(field: "memory", "must be a file under /dev/shm/")
        }
        self.path = path
        let fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw SharedMemoryError(field: "memory", "cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else {
            throw SharedMemoryError(field: "memory", "\(path) is not a regular file")
        }
        let size = Int(st.st_size)
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
        base = p
    }

    /// The requested bytes.
    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base + skew, count: length - skew) }

    deinit { munmap(base, length) }
}
