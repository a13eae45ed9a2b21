import CLibvirt

#if canImport(Glibc)
import Glibc
#endif

/// Why libvirt could not be reached or asked.
public struct LibvirtError: Error, Sendable, CustomStringConvertible {
    public let description: String
    init(_ d: String) { description = d }
}

/// A running libvirt domain as `virConnectListAllDomains` and `virDomainGetXMLDesc` give it.
public struct LibvirtDomain: Sendable, Equatable {
    public var name: String
    public var uuid: String
    public var id: Int
    /// The live domain XML.
    public var xml: String
    public init(name: String, uuid: String, id: Int, xml: String) {
        self.name = name; self.uuid = uuid; self.id = id; self.xml = xml
    }
}

/// A connection to libvirtd through the system's libvirt.so.0 (opened at run time),
/// with domain lifecycle events signalled on `eventFD` (libvirt's event loop runs on
/// a thread of its own). Closed when this object goes.
public final class LibvirtConnection: @unchecked Sendable {
    // @unchecked Sendable: libvirt's connection is thread-safe; the handle is only
    // read after init and freed in deinit.
    private let handle: OpaquePointer
    public let uri: String

    public init(uri: String) throws(LibvirtError) {
        var err = [CChar](repeating: 0, count: 512)
        guard let h = pvs_virt_open(uri, &err, err.count) else {
            throw LibvirtError(String(cString: err))
        }
        handle = h
        self.uri = uri
    }

    deinit { pvs_virt_close(handle) }

    /// Readable when a domain starts, stops or crashes, or the connection is lost.
    public var eventFD: Int32 { pvs_virt_event_fd(handle) }

    /// Resets `eventFD` (after a wake-up).
    public func drainEvents() {
        var v: UInt64 = 0
        _ = read(eventFD, &v, 8)
    }

    /// False once libvirtd went away (its restart): make a new connection.
    public var isAlive: Bool { pvs_virt_alive(handle) == 1 }

    /// The running domains, each with its live XML.
    public func runningDomains() throws(LibvirtError) -> [LibvirtDomain] {
        var err = [CChar](repeating: 0, count: 512)
        var list: UnsafeMutablePointer<pvs_virt_domain>?
        let n = pvs_virt_running_domains(handle, &list, &err, err.count)
        guard n >= 0 else { throw LibvirtError(String(cString: err)) }
        defer { pvs_virt_free_domains(list, n) }
        var out: [LibvirtDomain] = []
        for i in 0..<Int(n) {
            guard let d = list?[i], let xml = d.xml else { continue }
            let name = withUnsafeBytes(of: d.name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            let uuid = withUnsafeBytes(of: d.uuid) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            out.append(LibvirtDomain(name: name, uuid: uuid, id: Int(d.id), xml: String(cString: xml)))
        }
        return out
    }
}
