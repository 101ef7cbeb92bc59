import Foundation

/// rawmount mounts as the kernel lists them (/proc/self/mountinfo: type fuse.rawmount, the
/// image path as the source).
enum MountTable {
    /// Whether /proc/self/mountinfo has a fuse.rawmount mount at `path`.
    static func isRawmount(_ path: String) -> Bool { image(mountedAt: path) != nil }

    /// The image of the newest rawmount mount at `path` (its fsname), or nil.
    static func image(mountedAt path: String) -> String? {
        all().last { $0.mountpoint == path }?.image
    }

    /// Every rawmount mount visible here, oldest first.
    static func all() -> [(mountpoint: String, image: String, readOnly: Bool)] {
        guard let text = Paths.readFile("/proc/self/mountinfo") else { return [] }
        var found: [(String, String, Bool)] = []
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            guard parts.count > 5, let dash = parts.firstIndex(of: "-"), dash + 2 < parts.count,
                  parts[dash + 1] == "fuse.rawmount" else { continue }
            let readOnly = parts[5].split(separator: ",").contains("ro")
            found.append((unescape(String(parts[4])), unescape(String(parts[dash + 2])), readOnly))
        }
        return found
    }

    /// The type of the file system `path` (resolved) lies on: the mount with the longest
    /// mountpoint that contains it.
    static func fileSystemType(containing path: String) -> String? {
        guard let text = Paths.readFile("/proc/self/mountinfo") else { return nil }
        var best: (length: Int, type: String)? = nil
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            guard parts.count > 5, let dash = parts.firstIndex(of: "-"), dash + 1 < parts.count else { continue }
            let mp = unescape(String(parts[4]))
            let contains = mp == "/" || path == mp || path.hasPrefix(mp + "/")
            if contains && mp.count >= (best?.length ?? -1) { best = (mp.count, String(parts[dash + 1])) }
        }
        return best?.type
    }

    /// mountinfo escapes space, tab, newline and backslash as \ooo.
    static func unescape(_ s: String) -> String {
        var out = [UInt8](); let b = Array(s.utf8); var i = 0
        while i < b.count {
            if b[i] == 0x5C, i + 3 < b.count, let v = UInt8(String(decoding: b[i+1...i+3], as: UTF8.self), radix: 8) {
                out.append(v); i += 4
            } else { out.append(b[i]); i += 1 }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
