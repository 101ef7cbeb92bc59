import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// Who holds a file or a mount: for a lock refusal (OFD locks show no pid in /proc/locks, so
/// the holders are found by their open descriptors) and for a busy unmount.
enum Holders {
    /// Every other process with an open descriptor (or working directory) whose path, as the
    /// kernel shows it, `matches`. Only link texts are read: a stat through a descriptor on a
    /// hung FUSE mount would hang us too. Only this user's processes are readable unless root.
    /// `what` says which: "/a/b open" or "its working directory in /a".
    static func processes(where matches: (String) -> Bool) -> [(pid: pid_t, command: String, what: String)] {
        guard let proc = opendir("/proc") else { return [] }
        defer { closedir(proc) }
        var found: [(pid_t, String, String)] = []
        let me = getpid()
        while let entry = readdir(proc) {
            guard let pid = pid_t(entryName(entry)), pid != me else { continue }
            var links = ["/proc/\(pid)/cwd"]
            if let fds = opendir("/proc/\(pid)/fd") {
                while let fd = readdir(fds) {
                    let n = entryName(fd)
                    if Int(n) != nil { links.append("/proc/\(pid)/fd/\(n)") }
                }
                closedir(fds)
            }
            for link in links {
                guard let target = readLink(link), matches(target) else { continue }
                do {
                    let what = link.hasSuffix("/cwd") ? "its working directory in \(target)" : "\(target) open"
                    let comm = (Paths.readFile("/proc/\(pid)/comm") ?? "?").trimmingSpaces
                    found.append((pid, comm, what))
                    break
                }
            }
        }
        return found.sorted { $0.0 < $1.0 }
    }

    /// "held by rawmount (pid 812, serving /mnt/x); qemu-storage-d (pid 90)", or nil.
    static func lockHolders(of path: String) -> String? {
        guard let real = try? Paths.realPath(path) else { return nil }
        let users = processes { $0 == real }
        guard !users.isEmpty else { return nil }
        // A rawmount server is named by the mount it serves.
        let mounts = MountTable.all().filter { (try? Paths.realPath($0.image)) == real }
        let names = users.prefix(8).map { u -> String in
            if u.command == "rawmount", let mp = mounts.first(where: { pidOfServer(at: $0.mountpoint) == u.pid })?.mountpoint {
                return "rawmount (pid \(u.pid), serving \(mp))"
            }
            return "\(u.command) (pid \(u.pid))"
        }
        return "held by " + names.joined(separator: "; ")
    }

    /// What keeps the mount at `mp` busy: processes with files open under it (or their
    /// working directory there) and loop devices backed by its files.
    static func mountUsers(_ mp: String) -> [String] {
        let inside = { (p: String) in p == mp || p.hasPrefix(mp + "/") }
        var out = processes(where: inside).prefix(8).map { "\($0.command) (pid \($0.pid)) has \($0.what)" }
        if let block = opendir("/sys/block") {
            while let e = readdir(block) {
                let name = entryName(e)
                guard name.hasPrefix("loop"), let backing = Paths.readFile("/sys/block/\(name)/loop/backing_file")?.trimmingSpaces,
                      inside(backing) else { continue }
                out.append("/dev/\(name) is a loop device over \(backing) (losetup -d /dev/\(name))")
            }
            closedir(block)
        }
        return out
    }

    static func pidOfServer(at mp: String) -> pid_t? {
        (try? Paths.pidFile(forMountpoint: mp)).flatMap(Paths.readFile).flatMap { pid_t($0.trimmingSpaces) }
    }

    private static func entryName(_ entry: UnsafeMutablePointer<dirent>) -> String {
        withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }

    private static func readLink(_ path: String) -> String? {
        var buf = [CChar](repeating: 0, count: 4097)
        let n = readlink(path, &buf, 4096)
        guard n >= 0 else { return nil }
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
