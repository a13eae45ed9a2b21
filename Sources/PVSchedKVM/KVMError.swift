import SystemPackage

/// A failed KVM operation: which ioctl or step, and the errno it returned.
public struct KVMError: Error, Equatable, Sendable, CustomStringConvertible {
    public let operation: String
    public let errno: Errno?
    public let detail: String?

    public init(_ operation: String, errno: Errno? = nil, detail: String? = nil) {
        self.operation = operation; self.errno = errno; self.detail = detail
    }

    public var description: String {
        var s = "KVM \(operation) failed"
        if let errno { s += ": \(errno) (errno \(errno.rawValue))" }
        if let detail { s += ": \(detail)" }
        return s
    }
}

@inline(__always)
func check(_ result: Int, _ operation: @autoclosure () -> String) throws(KVMError) -> Int {
    if result < 0 { throw KVMError(operation(), errno: Errno(rawValue: Int32(-result))) }
    return result
}
