import BlockEngine

/// Persistent dirty bitmaps, as far as a writer that does not keep them yet must go: before
/// the first write every bitmap is flagged in use, which is how QEMU itself marks a bitmap
/// whose content no longer matches the disk (after a crash), so no one trusts a stale one
/// and `qemu-img check` still counts its clusters.
/// One entry of the bitmap directory.
public struct QCOW2Bitmap: Sendable {
    public var name: String
    public var granularity: UInt64
    public var flags: UInt32
    public var tableOffset: UInt64
    public var tableEntries: UInt32
    /// Where the entry starts in the directory (for rewriting its flags).
    var entryOffset: Int
    public var inUse: Bool { flags & QCOW2Bitmaps.flagInUse != 0 }
    public var auto: Bool { flags & QCOW2Bitmaps.flagAuto != 0 }
    /// The flags as `qemu-img info` names them.
    public var flagNames: [String] { (inUse ? ["in-use"] : []) + (auto ? ["auto"] : []) }
}

public enum QCOW2Bitmaps {
    static let flagInUse: UInt32 = 1 << 0
    static let flagAuto: UInt32 = 1 << 1
    static let maxDirectoryBytes: UInt64 = 64 << 20
    static let maxBitmaps: UInt32 = 65535
    static let maxNameBytes = 1023

    /// The bitmap directory with QEMU's limits (count, names 1 to 1023 bytes and unique,
    /// granularity 512 B to 2 GiB, type 1, no reserved flags), and the directory bytes.
    static func readDirectory(_ file: ImageFile, header h: QCOW2Header, fileSize: UInt64) throws -> (bitmaps: [QCOW2Bitmap], bytes: [UInt8]) {
        func bad(_ detail: String) -> BlockError { .invalid(file: file.path, field: "bitmap directory", detail: detail) }
        guard h.hasBitmaps else { return ([], []) }
        let size = h.bitmapDirectorySize, at = h.bitmapDirectoryOffset
        guard h.bitmapCount > 0, h.bitmapCount <= maxBitmaps else { throw bad("\(h.bitmapCount) bitmaps (QEMU allows 1 to \(maxBitmaps))") }
        guard size > 0, size <= maxDirectoryBytes, at % h.clusterSize == 0, at < fileSize, size <= fileSize - at else {
            throw bad("\(size) bytes at \(at) is not a cluster-aligned range inside the \(fileSize)-byte file")
        }
        let dir = try file.readBytes(count: Int(size), at: at, what: "qcow2 bitmap directory")
        var entry = 0
        var list: [QCOW2Bitmap] = []
        for n in 0..<h.bitmapCount {
            guard entry + 24 <= dir.count else { throw bad("entry \(n + 1) runs past the directory's end") }
            let nameSize = Int(dir[entry + 18]) << 8 | Int(dir[entry + 19]), extra = Int(be32(dir, entry + 20))
            let next = entry + (24 + extra + nameSize + 7) / 8 * 8
            guard next <= dir.count, nameSize > 0, nameSize <= maxNameBytes else { throw bad("entry \(n + 1) has a bad name size or runs past the directory's end") }
            let name = String(decoding: dir[(entry + 24 + extra) ..< (entry + 24 + extra + nameSize)], as: UTF8.self)
            let flags = be32(dir, entry + 12), type = dir[entry + 16], bits = UInt64(dir[entry + 17])
            guard type == 1 else { throw bad("bitmap '\(name)' has type \(type) (only 1, dirty tracking, exists)") }
            guard (9...31).contains(bits) else { throw bad("bitmap '\(name)' has granularity 2^\(bits) (QEMU allows 512 B to 2 GiB)") }
            guard flags & ~UInt32(0x7) == 0 else { throw bad("bitmap '\(name)' sets reserved flag bits 0x\(String(flags, radix: 16))") }
            guard !list.contains(where: { $0.name == name }) else { throw bad("two bitmaps are named '\(name)'") }
            list.append(QCOW2Bitmap(name: name, granularity: 1 << bits, flags: flags, tableOffset: be64(dir, entry),
                                    tableEntries: be32(dir, entry + 8), entryOffset: entry))
            entry = next
        }
        return (list, dir)
    }

    /// The image's bitmaps, for `rawmount info` (autoclear bit 0 clear: QEMU ignores them).
    public static func list(_ file: ImageFile, header h: QCOW2Header) throws -> [QCOW2Bitmap] {
        try readDirectory(file, header: h, fileSize: try file.size()).bitmaps
    }

    /// Flags every bitmap in use; false when the directory cannot be read as QEMU would
    /// (then the caller clears autoclear bit 0, so QEMU ignores the bitmaps altogether).
    static func markInUse(_ file: ImageFile, header h: QCOW2Header, fileSize: UInt64) throws -> Bool {
        guard var (bitmaps, dir) = try? readDirectory(file, header: h, fileSize: fileSize), !bitmaps.isEmpty else { return false }
        var changed = false
        for i in bitmaps.indices where !bitmaps[i].inUse {
            let v = bitmaps[i].flags | flagInUse
            let e = bitmaps[i].entryOffset
            put32be(&dir, e + 12, v)
            bitmaps[i].flags = v
            changed = true
        }
        if changed {
            try file.write(dir, at: h.bitmapDirectoryOffset)
            try file.sync()
        }
        return true
    }
}
