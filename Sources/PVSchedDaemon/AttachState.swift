import Foundation
import Logging
import PVSchedAttach
import PVSchedControl
import PVSchedCore
import PVSchedLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The VMs the daemon attached, recorded in a file under /run so that a restarted
/// daemon (or an upgraded one) serves them again: each as the `vm.attach` request
/// that attached it, with its driver and governor as they are now, and the VMM's pid
/// and start time (a VM whose process is gone, or whose pid now names another
/// process, is not attached again). Rewritten whole (a new file renamed over the
/// old, mode 0600) at every change; read back with the same checks as a request.
final class AttachState: Sendable {
    struct Record: Equatable, Sendable {
        var params: VMAttach.Params
        var process: Int32
        var startTime: UInt64
    }
    let path: String
    private let records = Mutex<[String: Record]>([:])
    private let logger: Logger

    init(path: String, logger: Logger) {
        self.path = path
        self.logger = logger
    }

    /// VM `name` was attached with `params` (its process `process`).
    func attached(_ name: String, params: VMAttach.Params, process: Int32) {
        guard let start = ProcessIdentity.startTime(of: process) else { return }
        var p = params
        p.name = name
        // The process is what the attach found: a QMP attach names it too from now on.
        p.pid = params.qmp == nil ? process : params.pid
        records.withLock { $0[name] = Record(params: p, process: process, startTime: start) }
        save()
    }

    /// VM `name`'s driver (nil: the default) or governor changed.
    func changed(_ name: String, driver: String?? = nil, governor: GovernorConfig? = nil) {
        let found = records.withLock { r -> Bool in
            guard r[name] != nil else { return false }
            if let driver { r[name]!.params.driver = driver }
            if let governor { r[name]!.params.governor = GovernorChange(full: governor) }
            return true
        }
        if found { save() }
    }

    /// VM `name` is no longer served (detached, or its VMM exited).
    func removed(_ name: String) {
        if records.withLock({ $0.removeValue(forKey: name) }) != nil { save() }
    }

    /// The records of the file, checked as requests; those whose process is gone are dropped.
    func load() -> [Record] {
        let fd: Int32
        do throws(SafeOpenError) {
            let dir = (path as NSString).deletingLastPathComponent
            fd = try SafeOpen.regularFile(path, under: dir, flags: O_RDONLY | O_CLOEXEC, owner: SafeOpen.Owner(uid: geteuid()),
                                          field: "state-file").fd
        } catch {
            if access(path, F_OK) == 0 { logger.warning("the state file is not used", metadata: ["reason": "\(error)"]) }
            return []
        }
        let handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        guard let data = try? handle.read(upToCount: 4 << 20), let doc = try? JSON.parse(Array(data)),
              let vms = doc["vms"]?.arrayValue else {
            logger.warning("the state file is not valid JSON; no VM is attached from it", metadata: ["path": "\(path)"])
            return []
        }
        var out: [Record] = []
        for v in vms {
            guard case .object(let o)? = v["params"], let process = v["process"]?.intValue, let start = v["startTime"]?.intValue,
                  process > 0, process <= Int64(Int32.max), start >= 0 else { continue }
            var rp = RequestParams(o)
            guard let params = try? VMAttach.Params(decoding: &rp), (try? rp.finish()) != nil, let name = params.name else {
                logger.warning("a record of the state file is not a valid attach; skipped")
                continue
            }
            guard ProcessIdentity.startTime(of: Int32(process)) == UInt64(start) else {
                logger.info("a VM of the state file is gone", metadata: ["vm": "\(name.escapedForDisplay)", "pid": "\(process)"])
                continue
            }
            out.append(Record(params: params, process: Int32(process), startTime: UInt64(start)))
        }
        return out
    }

    private func save() {
        let all = records.withLock { $0.values.sorted { ($0.params.name ?? "") < ($1.params.name ?? "") } }
        let doc: JSON = ["version": 1, "vms": .array(all.map { r in
            ["params": .object(r.params.encoded), "process": JSON(r.process), "startTime": JSON(r.startTime)]
        })]
        let dir = (path as NSString).deletingLastPathComponent
        _ = mkdir(dir, 0o755)
        let tmp = path + ".new"
        unlink(tmp)
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            logger.error("cannot write the state file", metadata: ["path": "\(tmp)", "errno": "\(errno)"])
            return
        }
        let bytes = doc.encoded + [10]
        let ok = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) == $0.count }
        close(fd)
        if !ok || rename(tmp, path) != 0 {
            unlink(tmp)
            logger.error("cannot write the state file", metadata: ["path": "\(path)"])
        }
    }
}

extension GovernorChange {
    /// Every field of `config` (unlimited when it is).
    init(full config: GovernorConfig) {
        self.init()
        if config == .unlimited { unlimited = true; return }
        func us(_ ns: UInt64) -> Int64 { Int64(min(ns / 1000, UInt64(GovernorChange.maxUs))) }
        criticalBudgetUs = max(1, us(config.criticalBudgetNs)); generalBudgetUs = max(1, us(config.generalBudgetNs))
        throttleWindowUs = us(config.throttleWindowNs); shareWindowUs = max(1, us(config.shareWindowNs))
        maxVMShare = config.maxVMShare; repaymentFactor = config.repaymentFactor
        maxRepaymentUs = us(config.maxRepaymentNs)
    }
}
