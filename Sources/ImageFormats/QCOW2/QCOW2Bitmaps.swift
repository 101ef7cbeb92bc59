import BlockEngine

/// Persistent dirty bitmaps, as far as a writer that does not keep them yet must go: before
/// the first write every bitmap is flagged in use, which is how QEMU itself marks a bitmap
/// whose content no longer matches the disk (after a crash), so no one trusts a stale one
/// and `qemu-img check` still counts its clusters.
enum QCOW2Bitmaps {
    static let flagInUse: UInt32 = 1 << 0
    static let maxDirectoryBytes: UInt64 = 64 << 20

    /// Flags every bitmap in use; false when the directory cannot be read as QEMU would
    /// (then the caller clears autoclear bit 0, so QEMU ignores the bitmaps altogether).
    static func markInUse(_ file: ImageFile, header h: QCOW2Header, fileSize: UInt64) throws -> Bool {
        let size = h.bitmapDirectorySize, at = h.bitmapDirectoryOffset
        guard h.bitmapCount > 0, size > 0, size <= maxDirectoryBytes, at % h.clusterSize == 0, at < fileSize, size <= fileSize - at else {
            return false
        }
        var dir = try file.readBytes(count: Int(size), at: at, what: "qcow2 bitmap directory")
        var entry = 0
        var flagged: [Int] = []
        for _ in 0..<h.bitmapCount {
            guard entry + 24 <= dir.count else { return false }
            let nameSize = Int(dir[entry + 18]) << 8 | Int(dir[entry + 19]), extra = Int(be32(dir, entry + 20))
            let next = entry + (24 + extra + nameSize + 7) / 8 * 8
            guard next <= dir.count else { return false }
            flagged.append(entry)
            entry = next
        }
        var changed = false
        for e in flagged {
            let flags = be32(dir, e + 12)
            guard flags & flagInUse == 0 else { continue }
            let v = flags | flagInUse
            for k in 0..<4 { dir[e + 12 + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(3 - k))) }
            changed = true
        }
        if changed {
            try file.write(dir, at: at)
            try file.sync()
        }
        return true
    }
}
