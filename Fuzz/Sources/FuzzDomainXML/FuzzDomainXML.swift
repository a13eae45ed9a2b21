import PVSchedDaemon
import PVSchedLibvirt
import PVSchedControl

/// libFuzzer target: a libvirt domain's XML as the daemon reads it (whoever may
/// define domains writes it). The scan never fails; every region it names is one
/// libvirt turns into a plain /dev/shm file name; metadata settings become attach
/// parameters or an error naming the `metadata` field (`metadata.ATTRIBUTE` for a plain name).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzDomainXML(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let xml = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    let d = DomainXML(xml)
    for r in d.pvschedRegions {
        guard DomainXML.isRegionName(r), !r.contains("/") else { fatalError("region name '\(r)' accepted") }
    }
    if let settings = d.pvschedSettings {
        var p = VMAttach.Params()
        do throws(ControlError) { try LibvirtSettings.apply(settings, to: &p) } catch {
            guard error.field == "metadata" || error.field.utf8.starts(with: "metadata.".utf8) else { fatalError("an error naming no metadata field: \(error)") }
        }
    }
    return 0
}
