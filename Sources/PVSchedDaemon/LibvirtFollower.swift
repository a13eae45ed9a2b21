import Foundation
import Logging
import PVSchedAttach
import PVSchedControl
import PVSchedCore
import PVSchedHost
import PVSchedLibvirt
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Serves libvirt's domains with no command (`libvirt = on`): every running QEMU
/// domain whose devices include a `<shmem name='pvsched-…'>` is attached when the
/// daemon starts (reconcile), when the domain starts, and again after libvirtd
/// restarts; it is detached (every boost undone) when the domain stops, is
/// destroyed or crashes. Through libvirt's own interfaces: its C library for the
/// running domains, their XML and lifecycle events; the QEMU process from libvirt's
/// pid file; the vCPU threads by QEMU's thread names (libvirt starts QEMU with
/// `debug-threads=on`); the region libvirt made, `/dev/shm/NAME`. The VM is named
/// after the domain (every verb also takes the domain's UUID); its driver, boost class and governor come from the domain's
/// pvsched metadata (`DomainXML`), else from the configuration.
///
/// One thread: it connects (again every 2 s while libvirtd cannot be reached), then
/// reconciles at every lifecycle event and every 5 s.
final class LibvirtFollower: Sendable {
    private let handler: ControlHandler
    private let uri: String
    private let logger: Logger
    private let running = Atomic(true)
    private let thread = Mutex<PVSchedCore.Thread?>(nil)
    /// Domains served: VM name → domain UUID.
    private let served = Mutex<[String: String]>([:])
    /// Running domains (UUID:id) the operator detached: not attached again until they restart.
    private let declined = Mutex<Set<String>>([])
    /// Causes already logged (one line per domain and cause, not per attempt).
    private let logged = Mutex<Set<String>>([])
    /// Where libvirt's QEMU driver keeps each running domain's pid file.
    static let runDirectory = "/run/libvirt/qemu"

    init(handler: ControlHandler, uri: String, logger: Logger) throws(ThreadError) {
        self.handler = handler
        self.uri = uri
        self.logger = logger
        let t = try PVSchedCore.Thread(name: "pvs-libvirt-fol") { [weak self] in self?.follow() }
        thread.withLock { $0 = t }
    }

    func stop() {
        running.store(false, ordering: .relaxed)
        thread.takeAndJoin()
    }

    /// The VMs this follower serves, by name, with their domains' UUIDs.
    var servedDomains: [String: String] { served.withLock { $0 } }

    private func follow() {
        var connection: LibvirtConnection?
        var unreachableLogged = false
        while running.load(ordering: .relaxed) {
            if connection == nil || connection?.isAlive == false {
                if connection != nil { logger.warning("libvirtd connection lost; reconnecting", metadata: ["uri": "\(uri)"]) }
                connection = nil
                do {
                    connection = try LibvirtConnection(uri: uri)
                    logger.info("following libvirt's domains", metadata: ["uri": "\(uri)"])
                    unreachableLogged = false
                } catch {
                    if !unreachableLogged {
                        logger.info("libvirt not reachable; trying again every 2 s", metadata: ["uri": "\(uri)", "reason": "\(error)"])
                        unreachableLogged = true
                    }
                    pause(ms: 2000)
                    continue
                }
            }
            guard let c = connection else { continue }
            reconcile(c)
            // Until a lifecycle event (or a lost connection), at most 5 s.
            var p = pollfd(fd: c.eventFD, events: Int16(POLLIN), revents: 0)
            var waited = 0
            while running.load(ordering: .relaxed) && waited < 5000 {
                if poll(&p, 1, 200) > 0 { c.drainEvents(); break }
                waited += 200
            }
        }
    }

    private func pause(ms: Int) {
        var left = ms
        while left > 0 && running.load(ordering: .relaxed) { usleep(100_000); left -= 100 }
    }

    /// Attaches the running pvsched domains not served yet; detaches those that stopped.
    func reconcile(_ c: LibvirtConnection) {
        let domains: [LibvirtDomain]
        do { domains = try c.runningDomains() } catch {
            logOnce("list", "cannot list libvirt's domains", ["reason": "\(error)"])
            return
        }
        var wanted: [String: (LibvirtDomain, String)] = [:]  // VM name → domain, region
        for d in domains {
            guard let region = DomainXML(d.xml).pvschedRegions.first else { continue }
            guard let name = QEMUDiscovery.vmName(from: d.name) else {
                logOnce("name:\(d.uuid)", "a libvirt domain's name cannot name a VM", ["domain": "\(d.name.escapedForDisplay)"])
                continue
            }
            wanted[name] = (d, region)
        }
        let sessions = handler.host.sessions
        // Stopped, destroyed or crashed domains, and VMs whose QEMU is gone (a domain
        // started again has a new one): detached, their boosts undone.
        for (name, uuid) in served.withLock({ $0 }) {
            let session = sessions.first { $0.handle.name == name }
            let live = session.map { $0.state == .running } ?? false
            if wanted[name]?.0.uuid == uuid && live { continue }
            served.withLock { _ = $0.removeValue(forKey: name) }
            handler.aliases.withLock { _ = $0.removeValue(forKey: uuid) }
            if session == nil, let (d, _) = wanted[name], d.uuid == uuid {
                // Detached by the operator (`vm stop`) while the domain runs: left alone
                // until the domain starts again.
                declined.withLock { _ = $0.insert("\(d.uuid):\(d.id)") }
                logger.info("libvirt domain left alone until it starts again (detached by the operator)", metadata: ["vm": "\(name)"])
                continue
            }
            if session != nil { detach(name) }
            logger.info("libvirt domain detached", metadata: ["vm": "\(name)", "why": "\(live ? "domain stopped" : "QEMU exited")"])
        }
        let runningKeys = Set(domains.map { "\($0.uuid):\($0.id)" })
        declined.withLock { $0.formIntersection(runningKeys) }
        for (name, (domain, region)) in wanted.sorted(by: { $0.key < $1.key })
        where served.withLock({ $0[name] == nil }) && !declined.withLock({ $0.contains("\(domain.uuid):\(domain.id)") }) {
            // Attached already (from the state file after a restart, or by hand): adopted.
            if let s = handler.host.sessions.first(where: { $0.handle.name == name }) {
                if s.state == .running {
                    served.withLock { $0[name] = domain.uuid }
                    handler.aliases.withLock { $0[domain.uuid] = name }
                    continue
                }
                detach(name)
            }
            attach(domain, name: name, region: region)
        }
    }

    /// Detaches VM `name` as `vm stop` does (its boosts undone, its record dropped).
    private func detach(_ name: String) {
        _ = handler.handle(ControlRequest(id: .null, method: VMStop.name, params: RequestParams(["vm": .string(name)])))
    }

    private func attach(_ d: LibvirtDomain, name: String, region: String) {
        var p = VMAttach.Params()
        p.name = name
        do throws(ControlError) {
            p.pid = try Self.qemuPID(domain: d.name)
            try LibvirtSettings.apply(DomainXML(d.xml).pvschedSettings ?? [:], to: &p)
        } catch {
            logOnce("attach:\(d.uuid):\(d.id):\(error.message)", "libvirt domain not served", ["domain": "\(d.name.escapedForDisplay)", "reason": "\(error)"])
            return
        }
        p.threadNames = VCPUThreadNaming.qemu.rawValue
        p.shm = "/dev/shm/\(region)"
        switch handler.handle(ControlRequest(id: .null, method: VMAttach.name, params: RequestParams(p.encoded))) {
        case .success:
            served.withLock { $0[name] = d.uuid }
            handler.aliases.withLock { $0[d.uuid] = name }
            logger.info("libvirt domain attached", metadata: ["vm": "\(name)", "domain": "\(d.name.escapedForDisplay)", "uuid": "\(d.uuid)",
                                                              "region": "\(region)"])
        case .failure(let error):
            logOnce("attach:\(d.uuid):\(d.id):\(error.message)", "libvirt domain not served", ["domain": "\(d.name.escapedForDisplay)", "reason": "\(error)"])
        }
    }

    /// Whether process `pid`, a QEMU named `guestName`, is the one libvirt runs for
    /// that domain (its pid file names it): this follower's to serve, not discovery's.
    static func runsDomain(pid: Int32, guestName: String) -> Bool {
        (try? qemuPID(domain: guestName)) == pid
    }

    /// The domain's QEMU process, from libvirt's pid file (root's, under /run/libvirt/qemu).
    static func qemuPID(domain: String) throws(ControlError) -> Int32 {
        guard !domain.isEmpty, !domain.contains("/"), domain != ".", domain != "..", domain.utf8.count <= 200 else {
            throw ControlError(.invalidParams, field: "domain", "a domain name libvirt would not use for a file")
        }
        let fd: Int32
        do throws(SafeOpenError) {
            fd = try SafeOpen.regularFile("\(runDirectory)/\(domain).pid", under: runDirectory, flags: O_RDONLY | O_CLOEXEC,
                                          owner: SafeOpen.Owner(uid: 0), field: "pidfile").fd
        } catch {
            throw ControlError(.invalidParams, field: "pidfile", "libvirt's pid file of the domain: \(error.message)")
        }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 32)
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0, let pid = Int32(String(decoding: buf[..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)), pid > 1 else {
            throw ControlError(.invalidParams, field: "pidfile", "libvirt's pid file of the domain holds no pid")
        }
        return pid
    }

    private func logOnce(_ cause: String, _ message: Logger.Message, _ metadata: Logger.Metadata) {
        guard logged.withLock({ l in
            if l.count >= 10_000 { l.removeAll() }  // bounded: a long-lived daemon sees many domain starts
            return l.insert(cause).inserted
        }) else { return }
        logger.warning(message, metadata: metadata)
    }
}

/// A domain's pvsched metadata (`<pvsched:pvsched driver=… boost=… governor=…/>`):
/// `driver` and `boost` as `vm attach` takes them, `governor` as `key=value,…` with
/// the configuration file's governor keys.
public enum LibvirtSettings {
    /// The domain's metadata settings (`driver`, `boost`, `governor`) as attach parameters.
    public static func apply(_ settings: [String: String], to p: inout VMAttach.Params) throws(ControlError) {
        for key in settings.keys where !["driver", "boost", "governor"].contains(key) {
            // The attribute is named in the field only when it is a plain XML name (a
            // field is an identifier; a mark or control character would join or hide it).
            let plain = key.utf8.count <= 32 && key.utf8.allSatisfy {
                ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x7A) || $0 == 0x2D || $0 == 0x5F || $0 == 0x3A || $0 == 0x2E
            }
            throw ControlError(.invalidParams, field: plain ? "metadata.\(key)" : "metadata",
                               "unknown pvsched metadata attribute '\(String(key.prefix(32)).escapedForDisplay)' (driver, boost, governor)")
        }
        p.driver = settings["driver"]
        p.boost = settings["boost"]
        if let g = settings["governor"] {
            // `key=value,key=value` with the configuration file's governor keys.
            let lines = g.split(separator: ",").map { $0.replacingOccurrences(of: "=", with: " = ") }
            for line in lines {
                let key = line.split(separator: " ").first.map(String.init) ?? ""
                guard DaemonConfig.governorFields[key] != nil else {
                    throw ControlError(.invalidParams, field: "metadata.governor",
                                       "'\(String(key.prefix(32)).escapedForDisplay)' is not a governor key (\(DaemonConfig.governorFields.keys.sorted().joined(separator: ", ")))")
                }
            }
            var c = DaemonConfig()
            do throws(ConfigError) { try c.apply(text: Data(lines.joined(separator: "\n").utf8), file: "metadata") } catch {
                throw ControlError(.invalidParams, field: "metadata.governor", "\(error.key ?? ""): \(error.message)")
            }
            p.governor = c.governor
        }
    }

}
