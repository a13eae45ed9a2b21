import Logging
import PVSchedCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The daemon's log lines on standard error: `LEVEL LABEL: MESSAGE key=value ...`.
/// Under systemd (`JOURNAL_STREAM` set) each line starts with its syslog priority
/// (`<3>` ... `<7>`), which journald reads, and carries no timestamp of its own
/// (the journal stamps it); elsewhere a timestamp leads. Every message and value is
/// escaped for display (guest and request strings reach the logs), and values with
/// spaces or quotes are quoted, so that each line is one record and `key=value`
/// fields parse.
public struct DaemonLogHandler: LogHandler {
    /// The daemon's level, one for every logger (a configuration reload changes it).
    private static let level = Atomic<UInt8>(2)
    private static let levels = Logger.Level.allCases

    /// Sets the level of every logger of the daemon.
    public static func setLevel(_ l: Logger.Level) {
        levelSet.store(true, ordering: .relaxed)
        level.store(UInt8(levels.firstIndex(of: l) ?? 2), ordering: .relaxed)
    }

    public var logLevel: Logger.Level {
        get { Self.levels[Int(Self.level.load(ordering: .relaxed))] }
        set { Self.setLevel(newValue) }
    }
    public var metadata: Logger.Metadata = [:]
    private let label: String
    private let journal: Bool

    /// A handler for `label`; the daemon's level is set once with `setLevel` (`level`
    /// here sets it only if nothing did before).
    public init(label: String, level: Logger.Level, journal: Bool = getenv("JOURNAL_STREAM") != nil) {
        self.label = label; self.journal = journal
        if !Self.levelSet.exchange(true, ordering: .relaxed) { Self.setLevel(level) }
    }
    private static let levelSet = Atomic(false)

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let line = format(level: event.level, message: "\(event.message)", metadata: metadata.merging(event.metadata ?? [:]) { $1 })
        _ = line.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
    }

    /// One line (with its newline) for a record.
    func format(level: Logger.Level, message: String, metadata: Logger.Metadata, now: String? = nil) -> String {
        var line = journal ? "<\(Self.priority(level))>" : "\(now ?? Self.timestamp()) \(level) "
        line += "\(label): \(message.escapedForDisplay)"
        for key in metadata.keys.sorted() {
            line += " \(key.escapedForDisplay)=\(Self.quoted("\(metadata[key]!)"))"
        }
        return line + "\n"
    }

    /// The syslog priority journald reads from the line's `<N>` prefix.
    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }

    /// A value as one field: escaped, and quoted when it has a space, a quote or `=`.
    static func quoted(_ value: String) -> String {
        let v = value.escapedForDisplay
        guard v.isEmpty || v.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" || $0 == "\\" }) else { return v }
        return "\"" + v.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
    }

    static func timestamp() -> String {
        var t = time(nil)
        var tm = tm()
        gmtime_r(&t, &tm)
        var buf = [CChar](repeating: 0, count: 32)
        strftime(&buf, buf.count, "%Y-%m-%dT%H:%M:%SZ", &tm)
        return String(cString: buf)
    }
}
