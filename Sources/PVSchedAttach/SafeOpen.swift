import CHostService

#if canImport(Glibc)
import Glibc
#endif

/// Why a file named in a request was refused: `field` is the request field (the
/// message never quotes the file's contents).
public struct SafeOpenError: Error, Equatable, Sendable, CustomStringConvertible {
    public let field: String
    public let message: String
    public init(field: String, _ message: String) { self.field = field; self.message = message }
    public var description: String { "\(field): \(message)" }
}

/// Opens files that a request names on a local user's behalf, as root, so that
/// the name cannot lead anywhere the user could not write themselves: no symbolic
/// link anywhere on the path (openat2 `RESOLVE_NO_SYMLINKS`, and
/// `RESOLVE_BENEATH` under a fixed directory), the right type, owned by root or by
/// the VMM process's user, and not writable by others.
public enum SafeOpen {
    /// Who may own a file a request names: root, or the user the VMM process runs as.
    public struct Owner: Equatable, Sendable {
        public let uid: UInt32
        /// The owner of `pid` (its real uid); nil when the process is gone.
        public static func process(_ pid: Int32) -> Owner? {
            var uid: UInt32 = 0
            return pvs_process_uid(pid, &uid) == 0 ? Owner(uid: uid) : nil
        }
        public init(uid: UInt32) { self.uid = uid }
    }

    /// Opens `path`, which must lie under `directory` (e.g. "/dev/shm"), with no
    /// symbolic link on the way, and checks that it is a regular file owned by root
    /// or `owner`, not writable by others. Returns the descriptor and its stat.
    public static func regularFile(_ path: String, under directory: String, flags: Int32, owner: Owner?,
                                   field: String) throws(SafeOpenError) -> (fd: Int32, stat: stat) {
        let prefix = directory.hasSuffix("/") ? directory : directory + "/"
        guard path.hasPrefix(prefix), path.count > prefix.count else {
            throw SafeOpenError(field: field, "must be a file under \(prefix)")
        }
        let dir = open(directory, Int32(PVS_O_PATH) | O_DIRECTORY | O_CLOEXEC)
        guard dir >= 0 else { throw SafeOpenError(field: field, "cannot open \(directory): \(String(cString: strerror(errno)))") }
        defer { close(dir) }
        let fd = pvs_open_no_symlinks(dir, String(path.dropFirst(prefix.count)), flags, 1)
        guard fd >= 0 else { throw SafeOpenError(field: field, "cannot open \(path): \(describe(-fd))") }
        do throws(SafeOpenError) {
            let st = try check(fd, path: path, type: S_IFREG, typeName: "a regular file", owner: owner, field: field)
            return (fd, st)
        } catch {
            close(fd)
            throw error
        }
    }

    /// Connects to the Unix socket at `path` with no symbolic link on the way; the
    /// socket file must be owned by root or by the user of the process serving it
    /// (its peer), and not writable by others. Returns the connected descriptor.
    public static func connectSocket(_ path: String, field: String) throws(SafeOpenError) -> Int32 {
        guard path.hasPrefix("/") else { throw SafeOpenError(field: field, "must be an absolute path") }
        let o = pvs_open_no_symlinks(Int32(AT_FDCWD), path, Int32(PVS_O_PATH), 0)
        guard o >= 0 else { throw SafeOpenError(field: field, "cannot open \(path): \(describe(-o))") }
        defer { close(o) }
        let st = try check(o, path: path, type: S_IFSOCK, typeName: "a socket", owner: nil, field: field)
        // Connect through the resolved descriptor: the name is not resolved a second time.
        let fd = pvs_unix_connect("/proc/self/fd/\(o)")
        guard fd >= 0 else { throw SafeOpenError(field: field, "cannot connect to \(path): \(String(cString: strerror(-fd)))") }
        var pid: Int32 = 0, uid: UInt32 = 0, gid: UInt32 = 0
        guard pvs_peer_cred(fd, &pid, &uid, &gid) == 0, pid > 0 else {
            close(fd)
            throw SafeOpenError(field: field, "\(path): cannot tell which process serves the socket")
        }
        guard st.st_uid == 0 || st.st_uid == uid else {
            close(fd)
            throw SafeOpenError(field: field, "\(path) is owned by uid \(st.st_uid), neither root nor the user of the process serving it")
        }
        return fd
    }

    private static func check(_ fd: Int32, path: String, type: mode_t, typeName: String, owner: Owner?,
                              field: String) throws(SafeOpenError) -> stat {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SafeOpenError(field: field, "cannot stat \(path)") }
        guard st.st_mode & S_IFMT == type else { throw SafeOpenError(field: field, "\(path) is not \(typeName)") }
        guard st.st_uid == 0 || owner.map({ st.st_uid == $0.uid }) == true || (owner == nil && type == S_IFSOCK) else {
            throw SafeOpenError(field: field, "\(path) is owned by uid \(st.st_uid), neither root nor the VMM's user\(owner.map { " (uid \($0.uid))" } ?? "")")
        }
        guard st.st_mode & S_IWOTH == 0 else { throw SafeOpenError(field: field, "\(path) is writable by any user") }
        return st
    }

    private static func describe(_ errno: Int32) -> String {
        switch errno {
        case ELOOP: return "a symbolic link on the path (not followed)"
        case EXDEV: return "the path leads out of its directory"
        default: return String(cString: strerror(errno))
        }
    }

    /// Whether process `pid` maps the file `st` describes (/proc/PID/maps: device
    /// and inode): a region is one the VMM actually shares with its guest.
    public static func isMapped(_ st: stat, by pid: Int32) -> Bool {
        guard let f = fopen("/proc/\(pid)/maps", "re") else { return false }
        defer { fclose(f) }
        let dev = UInt64(st.st_dev)
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff)
        let minor = (dev & 0xff) | ((dev >> 12) & ~0xff)
        let device = String(major, radix: 16).leftPadded(2) + ":" + String(minor, radix: 16).leftPadded(2)
        let inode = String(UInt64(st.st_ino))
        var line = [CChar](repeating: 0, count: 4096)
        while fgets(&line, Int32(line.count), f) != nil {
            // "start-end perms offset dev inode path"
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let fields = text.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
            guard fields.count >= 5 else { continue }
            if fields[3] == device && fields[4] == inode { return true }
        }
        return false
    }
}

extension String {
    fileprivate func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}
