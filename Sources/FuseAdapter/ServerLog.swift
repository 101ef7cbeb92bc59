#if canImport(Glibc)
import Glibc
#endif
import BlockEngine
import Synchronization

/// `mount --log FILE`: one line per failed request (and close errors), so an EIO a detached
/// server returned can be traced to the image, offset and cause afterwards.
public final class ServerLog: Sendable {
    private let fd: Int32
    private let writeLock = Mutex(())
    public let path: String

    public init(path: String) throws {
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw BlockError.io(file: path, operation: "open log", offset: nil, errno: errno) }
        self.path = path
    }

    deinit { close(fd) }

    public func record(_ message: String) {
        var now = time(nil)
        var parts = tm()
        gmtime_r(&now, &parts)
        var stamp = [CChar](repeating: 0, count: 32)
        strftime(&stamp, stamp.count, "%Y-%m-%dT%H:%M:%SZ", &parts)
        let line = String(decoding: stamp.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) + " " + message + "\n"
        writeLock.withLock { _ in _ = line.withCString { write(fd, $0, strlen($0)) } }
    }
}
