#if canImport(Glibc)
import Glibc
#endif
import BlockEngine
import Synchronization

/// Where failed requests (and close errors) are told, so an EIO a detached server returned
/// can be traced to the image, offset and cause afterwards: `mount --log FILE` (one stamped
/// line each), the terminal of a `--foreground` server, and syslog for a detached `--verbose` one.
public final class ServerLog: Sendable {
    private let fd: Int32
    private let toStandardError: Bool
    private let toSyslog: Bool
    private let writeLock = Mutex(())
    public let path: String?

    public init(path: String?, toStandardError: Bool = false, toSyslog: Bool = false) throws {
        if let path {
            // Never through a symlink: one planted at the log's name would make a root server
            // append to any file it names.
            fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY, 0o644)
            guard fd >= 0 else {
                let e = errno
                if e == ELOOP { throw BlockError.usage("--log \(path): is a symbolic link; give the log file's own name") }
                throw BlockError.io(file: path, operation: "open log", offset: nil, errno: e)
            }
            var st = stat()
            guard fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFREG else {
                close(fd)
                throw BlockError.usage("--log \(path): is not a regular file")
            }
        } else {
            fd = -1
        }
        self.path = path
        self.toStandardError = toStandardError
        self.toSyslog = toSyslog
        if toSyslog { openlog("rawmount", LOG_PID, LOG_DAEMON) }
    }

    deinit { if fd >= 0 { close(fd) } }

    public func record(_ message: String) {
        // One line per record, whatever an image's strings hold.
        let message = message.escapingControls
        if toSyslog { message.withCString { text in withVaList([text]) { vsyslog(LOG_ERR, "%s", $0) } } }
        writeLock.withLock { _ in
            if toStandardError { _ = "rawmount: \(message)\n".withCString { write(2, $0, strlen($0)) } }
            guard fd >= 0 else { return }
            var now = time(nil)
            var parts = tm()
            gmtime_r(&now, &parts)
            var stamp = [CChar](repeating: 0, count: 32)
            strftime(&stamp, stamp.count, "%Y-%m-%dT%H:%M:%SZ", &parts)
            let line = String(decoding: stamp.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) + " " + message + "\n"
            _ = line.withCString { write(fd, $0, strlen($0)) }
        }
    }
}
