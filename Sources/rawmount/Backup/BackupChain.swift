import BlockEngine
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// One backup folder's chain for one image: `<stem>.full.<time>.qcow2`, then
/// `<stem>.inc.<time>.qcow2` files each backed by the one before, and the manifest
/// `<stem>.backup.json` that lists them in order with what each holds. Times are UTC with
/// milliseconds (20261206T142000.123Z), so names sort in chain order.
struct BackupChain {
    struct Point {
        var file: String          // name inside the folder
        var kind: String          // "full" or "incremental"
        var time: String
        var bitmap: String
        var bytesCopied: UInt64
        var bytesZeroed: UInt64
        var extents: Int
        var diskSize: UInt64
        /// SHA-256 of the disk at backup time (`--hash`), to check a restore against.
        var sha256: String?
    }

    let folder: String
    let stem: String
    var points: [Point]

    var manifestPath: String { folder + "/" + stem + ".backup.json" }
    var last: Point? { points.last }

    /// The chain as the manifest lists it, keeping only points whose files exist (a file
    /// deleted by hand ends the chain before it: later ones would restore wrong).
    static func load(folder: String, stem: String) throws -> BackupChain {
        var chain = BackupChain(folder: folder, stem: stem, points: [])
        guard let data = FileManager.default.contents(atPath: chain.manifestPath) else { return chain }
        guard let root = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let list = root["chain"] as? [[String: Any]] else {
            throw BlockError.invalid(file: chain.manifestPath, field: "backup manifest", detail: "not the JSON rawmount writes")
        }
        for item in list {
            guard let file = item["file"] as? String, let kind = item["kind"] as? String, !file.contains("/"), !file.hasPrefix(".") else {
                throw BlockError.invalid(file: chain.manifestPath, field: "backup manifest", detail: "an entry without a plain file name")
            }
            guard access(folder + "/" + file, F_OK) == 0 else { break }
            chain.points.append(Point(file: file, kind: kind, time: item["time"] as? String ?? "", bitmap: item["bitmap"] as? String ?? "",
                                      bytesCopied: (item["bytes-copied"] as? NSNumber)?.uint64Value ?? 0,
                                      bytesZeroed: (item["bytes-zeroed"] as? NSNumber)?.uint64Value ?? 0,
                                      extents: item["extents"] as? Int ?? 0,
                                      diskSize: (item["disk-size"] as? NSNumber)?.uint64Value ?? 0, sha256: item["sha256"] as? String))
        }
        // The chain restarts at its last full backup.
        if let full = chain.points.lastIndex(where: { $0.kind == "full" }) { chain.points.removeFirst(full) } else { chain.points = [] }
        return chain
    }

    /// Writes the manifest so that it is either the old one or the new one after a crash
    /// (a new file made durable, renamed over the old, the folder made durable).
    func save() throws {
        let list: [[String: Any]] = points.map { p in
            var d: [String: Any] = ["file": p.file, "kind": p.kind, "time": p.time, "bitmap": p.bitmap, "bytes-copied": p.bytesCopied,
                                    "bytes-zeroed": p.bytesZeroed, "extents": p.extents, "disk-size": p.diskSize]
            if let h = p.sha256 { d["sha256"] = h }
            return d
        }
        let data = try JSONSerialization.data(withJSONObject: ["format": "rawmount-backup-1", "chain": list], options: [.prettyPrinted, .sortedKeys])
        let tmp = manifestPath + ".partial"
        try Durable.write(data, to: tmp)
        try Durable.rename(tmp, to: manifestPath, folder: folder)
    }

    /// The name of a new point: its kind and the time, later than every point's.
    func newName(kind: String) -> (file: String, time: String) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var ms = Int64(now.tv_sec) * 1000 + Int64(now.tv_nsec) / 1_000_000
        var time = Self.stamp(ms)
        while let last, time <= last.time { ms += 1; time = Self.stamp(ms) }
        return ("\(stem).\(kind == "full" ? "full" : "inc").\(time).qcow2", time)
    }

    static func stamp(_ ms: Int64) -> String {
        var t = time_t(ms / 1000)
        var parts = tm()
        gmtime_r(&t, &parts)
        var out = [CChar](repeating: 0, count: 32)
        strftime(&out, out.count, "%Y%m%dT%H%M%S", &parts)
        let frac = String(ms % 1000)
        return String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            + "." + String(repeating: "0", count: 3 - frac.count) + frac + "Z"
    }

    /// The stem backups of `image` are named by: its file name without the extension.
    static func stem(of image: String) -> String {
        let base = PathName.baseName(image)
        guard let dot = base.lastIndex(of: "."), dot != base.startIndex else { return base }
        return String(base[..<dot])
    }
}

/// Writes that survive a crash whole or not at all.
enum Durable {
    static func write(_ data: Data, to path: String) throws {
        try HostFaults.point(.write, path)
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard fd >= 0 else { throw BlockError.io(file: path, operation: "create", offset: nil, errno: errno) }
        defer { close(fd) }
        let ok = data.withUnsafeBytes { b -> Bool in
            var done = 0
            while done < b.count {
                let n = Glibc.write(fd, b.baseAddress! + done, b.count - done)
                if n < 0 { if errno == EINTR { continue }; return false }
                done += n
            }
            return true
        }
        try HostFaults.point(.sync, path)
        guard ok, fsync(fd) == 0 else { throw BlockError.io(file: path, operation: "write", offset: nil, errno: errno) }
    }

    static func rename(_ from: String, to: String, folder: String) throws {
        try HostFaults.point(.write, to)
        guard Glibc.rename(from, to) == 0 else { throw BlockError.io(file: to, operation: "rename", offset: nil, errno: errno) }
        try syncFolder(folder)
    }

    static func syncFolder(_ folder: String) throws {
        try HostFaults.point(.sync, folder)
        let fd = open(folder, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw BlockError.io(file: folder, operation: "open", offset: nil, errno: errno) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw BlockError.io(file: folder, operation: "fsync", offset: nil, errno: errno) }
    }
}
