import BlockEngine

/// The VHDX log: metadata changes are written here first and then applied; a header whose
/// log GUID is set may have entries still to apply. Whether it does is what QEMU asks
/// before a read-only open: an entry with the header's log GUID whose CRC-32C holds.
/// (Replaying is not done here yet: such an image is refused, with the command that
/// replays it.)
enum VHDXLog {
    static let sector: UInt64 = 4096
    /// Bytes of candidate entries checksummed before the search gives up and counts the log
    /// as needing replay (a hostile log of many look-alike entries stays bounded work).
    static let budget: UInt64 = 256 << 20

    static func needsReplay(_ file: ImageFile, header h: VHDXHeader) throws -> Bool {
        guard !h.logGUID.isZero, h.logLength > 0 else { return false }
        var spent: UInt64 = 0
        var at: UInt64 = 0
        while at < h.logLength {
            let head = try file.readBytes(count: Int(sector), at: h.logOffset + at, what: "VHDX log entry")
            at += sector
            guard Array(head[0..<4]) == Array("loge".utf8), Array(head[32..<48]) == h.logGUID.bytes else { continue }
            let length = UInt64(le32(head, 8))
            guard length >= sector, length % sector == 0, length <= h.logLength else { continue }
            spent += length
            if spent > budget { return true }
            // An entry may wrap around the end of the circular log.
            let start = at - sector
            var entry = try file.readBytes(count: Int(min(length, h.logLength - start)), at: h.logOffset + start, what: "VHDX log entry")
            if UInt64(entry.count) < length {
                entry += try file.readBytes(count: Int(length) - entry.count, at: h.logOffset, what: "VHDX log entry")
            }
            if le32(entry, 4) == crc32c(entry, zeroing: 4) { return true }
        }
        return false
    }
}
