import BlockEngine
import Glibc

/// One internal snapshot from the qcow2 snapshot table: its own L1 table and disk size.
public struct QCOW2Snapshot: Sendable {
    public var id: String
    public var name: String
    public var l1Offset: UInt64
    public var l1Entries: UInt32
    /// The disk's size when the snapshot was taken (extra data), else the image's size.
    public var diskSize: UInt64
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32 = 0
    /// The guest clock when the snapshot was taken (0 for disk-only snapshots).
    public var vmClockNanoseconds: UInt64 = 0
    public var vmStateSize: UInt64
    /// Instructions counted (record/replay); nil when the entry does not store it.
    public var icount: UInt64? = nil
    /// The entry as stored (unknown extra data included), kept when the table is rewritten.
    var stored: [UInt8] = []

    /// "YYYY-MM-DD hh:mm:ss" (UTC) of the snapshot.
    public var dateText: String { dateText(local: false) }

    /// The date in UTC, or (`local`) in the local time zone, as qemu-img snapshot -l prints it.
    public func dateText(local: Bool) -> String {
        var t = time_t(dateSeconds)
        var parts = tm()
        if local { localtime_r(&t, &parts) } else { gmtime_r(&t, &parts) }
        var out = [CChar](repeating: 0, count: 32)
        strftime(&out, out.count, "%Y-%m-%d %H:%M:%S", &parts)
        return String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Reads and checks the snapshot table with QEMU's limits: at most 65536 snapshots, a table
/// of at most 64 MiB, at most 1 KiB of extra data per entry, and every L1 like the active one.
public enum QCOW2Snapshots {
    static let maxSnapshots: UInt32 = 65536
    static let maxTableBytes: UInt64 = 64 << 20
    static let maxExtraData = 1024

    public static func read(from file: ImageFile, header h: QCOW2Header) throws -> [QCOW2Snapshot] {
        try readTable(from: file, header: h).snapshots
    }

    /// The snapshots and the bytes their table takes (for the refcount walk).
    static func readTable(from file: ImageFile, header h: QCOW2Header) throws -> (snapshots: [QCOW2Snapshot], bytes: UInt64) {
        guard h.snapshots > 0 else { return ([], 0) }
        let path = file.path, fileSize = try file.size()
        func bad(_ detail: String) -> BlockError { .invalid(file: path, field: "snapshot table", detail: detail) }
        guard h.snapshots <= maxSnapshots else { throw bad("\(h.snapshots) snapshots is more than QEMU's \(maxSnapshots)") }
        guard h.snapshotsOffset % h.clusterSize == 0, h.snapshotsOffset >= h.clusterSize, h.snapshotsOffset < fileSize else {
            throw bad("offset \(h.snapshotsOffset) is not a cluster inside the \(fileSize)-byte file")
        }
        var at = h.snapshotsOffset
        var list: [QCOW2Snapshot] = []
        for n in 0..<h.snapshots {
            guard at - h.snapshotsOffset + 40 <= maxTableBytes else { throw bad("larger than QEMU's 64 MiB limit") }
            let fixed = try file.readBytes(count: 40, at: at, what: "snapshot \(n + 1) header")
            let idSize = Int(fixed[12]) << 8 | Int(fixed[13]), nameSize = Int(fixed[14]) << 8 | Int(fixed[15])
            let extraSize = Int(be32(fixed, 36))
            guard extraSize <= maxExtraData else { throw bad("snapshot \(n + 1) has \(extraSize) bytes of extra data (QEMU allows \(maxExtraData))") }
            let rest = try file.readBytes(count: extraSize + idSize + nameSize, at: at + 40, what: "snapshot \(n + 1) entry")
            let extra = Array(rest[0..<extraSize])
            var s = QCOW2Snapshot(
                id: String(decoding: rest[extraSize ..< extraSize + idSize], as: UTF8.self),
                name: String(decoding: rest[(extraSize + idSize)...], as: UTF8.self),
                l1Offset: be64(fixed, 0), l1Entries: be32(fixed, 8), diskSize: h.size, dateSeconds: be32(fixed, 16),
                vmStateSize: UInt64(be32(fixed, 32)))
            s.dateNanoseconds = be32(fixed, 20)
            s.vmClockNanoseconds = be64(fixed, 24)
            if extraSize >= 8 { s.vmStateSize = be64(extra, 0) }
            if extraSize >= 16 { s.diskSize = be64(extra, 8) }
            if extraSize >= 24 { s.icount = be64(extra, 16) }
            let entryBytes = UInt64(40 + extraSize + idSize + nameSize)
            s.stored = fixed + rest + [UInt8](repeating: 0, count: Int((entryBytes + 7) / 8 * 8 - entryBytes))
            list.append(s)
            at += (entryBytes + 7) / 8 * 8
        }
        guard at - h.snapshotsOffset <= maxTableBytes else { throw bad("larger than QEMU's 64 MiB limit") }
        return (list, at - h.snapshotsOffset)
    }

    /// A new entry as QEMU writes it: 24 bytes of extra data (VM state size, disk size, icount),
    /// then the ID and the name, padded to 8 bytes.
    static func entry(l1Offset: UInt64, l1Entries: UInt32, id: String, name: String, dateSeconds: UInt32,
                      dateNanoseconds: UInt32, diskSize: UInt64) -> [UInt8] {
        let idBytes = Array(id.utf8), nameBytes = Array(name.utf8)
        var e = [UInt8](repeating: 0, count: 40 + 24)
        put64be(&e, 0, l1Offset)
        put32be(&e, 8, l1Entries)
        e[12] = UInt8(idBytes.count >> 8); e[13] = UInt8(idBytes.count & 0xFF)
        e[14] = UInt8(nameBytes.count >> 8); e[15] = UInt8(nameBytes.count & 0xFF)
        put32be(&e, 16, dateSeconds)
        put32be(&e, 20, dateNanoseconds)
        put32be(&e, 36, 24)
        put64be(&e, 48, diskSize)
        e += idBytes + nameBytes
        return e + [UInt8](repeating: 0, count: (8 - e.count % 8) % 8)
    }

    /// The snapshot named `key`, by ID first and then by name, as qemu-img and qemu-nbd pick it.
    static func find(_ key: String, in list: [QCOW2Snapshot], file: String) throws -> QCOW2Snapshot {
        if let s = list.first(where: { $0.id == key }) ?? list.first(where: { $0.name == key }) { return s }
        let known = list.isEmpty ? "the image has none" : "it has " + list.map { "\($0.id) (\($0.name))" }.joined(separator: ", ")
        throw BlockError.invalid(file: file, field: "snapshot", detail: "no snapshot with ID or name '\(key)'; \(known)")
    }
}
