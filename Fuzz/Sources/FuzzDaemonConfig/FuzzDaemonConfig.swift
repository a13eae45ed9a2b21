import Foundation
import PVSchedDaemon

/// libFuzzer target: the daemon's configuration parser (`pvsched.conf` and
/// `conf.d/*.conf`). Any input is accepted or refused with an error naming its
/// line; whatever is accepted renders to a file that is accepted again and means
/// the same.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzDaemonConfig(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var config = DaemonConfig()
    do throws(ConfigError) {
        try config.apply(text: Data(bytes: data, count: size), file: "fuzz")
    } catch {
        guard error.file == "fuzz", error.line >= 0 else { fatalError("an error that names no line: \(error)") }
        return 0
    }
    var again = DaemonConfig()
    do throws(ConfigError) { try again.apply(text: Data(config.rendered.utf8), file: "rendered") } catch {
        fatalError("the rendered configuration is refused: \(error)\n\(config.rendered)")
    }
    guard again.rendered == config.rendered else { fatalError("rendering differs:\n\(config.rendered)\n---\n\(again.rendered)") }
    return 0
}
