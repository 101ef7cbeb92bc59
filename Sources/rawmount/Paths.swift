#if canImport(Glibc)
import Glibc
#endif
import BlockEngine

enum Paths {
    static func realPath(_ path: String) throws -> String {
        guard let p = realpath(path, nil) else {
            throw BlockError.io(file: path, operation: "resolve path", offset: nil, errno: errno)
        }
        defer { free(p) }
        return String(cString: p)
    }

    /// `path` made absolute with its directory resolved, but its last component kept as
    /// named (a symlinked image stays the link, as QEMU opens it).
    static func asNamed(_ path: String) throws -> String {
        var trimmed = path
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed.removeLast() }
        let dir = PathName.directory(of: trimmed)
        let resolved = try realPath(dir.isEmpty ? "." : dir)
        return (resolved == "/" ? "" : resolved) + "/" + PathName.baseName(trimmed)
    }

    /// Like `realPath`, but also for a FUSE mountpoint whose server died: stat on it fails
    /// with ENOTCONN, so its parent is resolved instead.
    static func mountpointPath(_ path: String) throws -> String {
        do { return try realPath(path) } catch let error as BlockError {
            guard error.errnoValue == ENOTCONN else { throw error }
            return try asNamed(path)
        }
    }

    /// `win.vmdk` -> `win.raw`; a name without extension just gains `.raw`.
    static func rawName(forImage path: String) -> String {
        let base = PathName.baseName(path)
        if let dot = base.lastIndex(of: "."), dot != base.startIndex {
            return String(base[..<dot]) + ".raw"
        }
        return base + ".raw"
    }

    /// Where a serving process records its pid, keyed by the canonical mountpoint.
    static func pidFile(forMountpoint mp: String) -> String {
        let dir = getuid() == 0 ? "/run/rawmount" : "/tmp/rawmount-\(getuid())"
        mkdir(dir, 0o700)
        var name = ""
        for c in mp.unicodeScalars {
            switch c {
            case "/": name += "%2F"
            case "%": name += "%25"
            default: name.unicodeScalars.append(c)
            }
        }
        return dir + "/" + name + ".pid"
    }

    /// Where a detached server leaves what went wrong while closing, for `unmount` to report.
    static func closeErrorFile(forMountpoint mp: String) -> String { pidFile(forMountpoint: mp) + ".error" }

    static func writeFile(_ path: String, _ text: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        _ = text.withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }

    static func readFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buf, buf.count)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// Prints one line to stderr.
func printError(_ text: String) {
    var line = text
    if !line.hasSuffix("\n") { line += "\n" }
    _ = line.withCString { write(2, $0, strlen($0)) }
}

/// A message for any error: BlockError's sentence, or the error's own description.
func describe(_ error: Error) -> String {
    if let e = error as? BlockError { return e.description }
    return "\(error)"
}
