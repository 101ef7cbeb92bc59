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
            fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw BlockError.io(file: path, operation: "open log", offset: nil, errno: errno) }
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
        if toSyslog { withVaList([message]) { vsyslog(LOG_ERR, "%s", $0) } }
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
