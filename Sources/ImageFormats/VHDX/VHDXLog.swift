import BlockEngine

/// The VHDX log: a circular buffer of 4 KiB sectors in which metadata changes are written
/// (and made durable) before they are applied in place. An entry: a 64-byte header
/// ("loge", CRC-32C over the whole entry, length, tail, sequence number, descriptor count,
/// the log GUID, flushed and last file offsets), 32-byte descriptors ("desc": a 4 KiB
/// sector to write at a file offset, its first 8 and last 4 bytes kept in the descriptor;
/// "zero": a range to zero), then one data sector ("data") per "desc". Only entries with
/// the header's log GUID count. Replay and search follow QEMU: the active sequence is the
/// run of valid entries with consecutive sequence numbers whose first has the highest one.
enum VHDXLog {
    static let sector = 4096
    /// Bytes of candidate entries read and checksummed in one search, at most (a hostile log
    /// of many look-alike entries stays bounded work); past it the open is refused.
    static let searchBudget: UInt64 = 256 << 20
    /// How far a replay may grow the file (the log's last file offset), at most.
    static let maxGrowth: UInt64 = 256 << 20

    struct Descriptor {
        var zero: Bool
        var fileOffset: UInt64
        /// "zero": bytes to zero; "desc": the sector's first 8 and last 4 bytes.
        var zeroLength: UInt64
        var leading: [UInt8], trailing: [UInt8]
    }

    struct Entry {
        var sequence: UInt64
        var flushedFileOffset: UInt64
        var lastFileOffset: UInt64
        var descriptors: [Descriptor]
        /// The 4084 payload bytes of each data sector, in descriptor order.
        var data: [[UInt8]]
    }

    /// Reads `count` sectors of the circular log from byte `at` (wrapping at its end).
    private static func read(_ file: ImageFile, _ h: VHDXHeader, at: UInt64, sectors count: Int) throws -> [UInt8] {
        let first = min(UInt64(count * sector), h.logLength - at)
        var b = try file.readBytes(count: Int(first), at: h.logOffset + at, what: "VHDX log")
        if b.count < count * sector {
            b += try file.readBytes(count: count * sector - b.count, at: h.logOffset, what: "VHDX log")
        }
        return b
    }

    /// The entry at log byte `at`, if it is valid for `h`'s log GUID (and follows `after`).
    private static func entry(_ file: ImageFile, _ h: VHDXHeader, at: UInt64, after: UInt64?, spent: inout UInt64) throws -> (Entry, length: UInt64)? {
        let head = try read(file, h, at: at, sectors: 1)
        guard Array(head[0..<4]) == Array("loge".utf8), Array(head[32..<48]) == h.logGUID.bytes else { return nil }
        let length = UInt64(le32(head, 8)), seq = le64(head, 16), count = UInt64(le32(head, 24))
        guard length >= UInt64(sector), length % UInt64(sector) == 0, length <= h.logLength, seq != 0,
              count * 32 <= length, after.map({ seq == $0 + 1 }) ?? true else { return nil }
        let descSectors = (count + 2 + 127) / 128
        guard descSectors * UInt64(sector) <= length else { return nil }
        spent += length
        guard spent <= searchBudget else {
            throw BlockError.invalid(file: file.path, field: "VHDX log", detail: "more than \(searchBudget >> 20) MiB of candidate entries to search")
        }
        let bytes = try read(file, h, at: at, sectors: Int(length) / sector)
        guard le32(bytes, 4) == crc32c(bytes, zeroing: 4) else { return nil }
        var descriptors: [Descriptor] = []
        var data: [[UInt8]] = []
        var nextData = Int(descSectors) * sector
        for i in 0..<Int(count) {
            let d = 64 + i * 32
            let sig = String(decoding: bytes[d ..< d + 4], as: UTF8.self)
            let fileOffset = le64(bytes, d + 16)
            guard le64(bytes, d + 24) == seq, fileOffset % UInt64(sector) == 0 else { return nil }
            switch sig {
            case "zero":
                let n = le64(bytes, d + 8)
                guard n % UInt64(sector) == 0 else { return nil }
                descriptors.append(Descriptor(zero: true, fileOffset: fileOffset, zeroLength: n, leading: [], trailing: []))
            case "desc":
                // Its data sector, which carries the same sequence number split in two.
                guard nextData + sector <= bytes.count else { return nil }
                let s = Array(bytes[nextData ..< nextData + sector])
                guard Array(s[0..<4]) == Array("data".utf8), UInt64(le32(s, 4)) << 32 | UInt64(le32(s, 4092)) == seq else { return nil }
                data.append(Array(s[8..<4092]))
                nextData += sector
                descriptors.append(Descriptor(zero: false, fileOffset: fileOffset, zeroLength: 0,
                                              leading: Array(bytes[d + 8 ..< d + 16]), trailing: Array(bytes[d + 4 ..< d + 8])))
            default:
                return nil
            }
        }
        return (Entry(sequence: seq, flushedFileOffset: le64(head, 48), lastFileOffset: le64(head, 56), descriptors: descriptors, data: data), length)
    }

    /// The active sequence of entries to replay (empty: nothing to do).
    static func activeSequence(_ file: ImageFile, header h: VHDXHeader) throws -> [Entry] {
        guard !h.logGUID.isZero, h.logLength > 0 else { return [] }
        var best: [Entry] = []
        var spent: UInt64 = 0
        var at: UInt64 = 0
        while at < h.logLength {
            guard let (first, length) = try entry(file, h, at: at, after: nil, spent: &spent) else {
                at += UInt64(sector)
                continue
            }
            var run = [first]
            var next = (at + length) % h.logLength
            var covered = length
            while covered < h.logLength, let (e, n) = try entry(file, h, at: next, after: run.last!.sequence, spent: &spent) {
                run.append(e)
                next = (next + n) % h.logLength
                covered += n
            }
            if best.isEmpty || first.sequence > best[0].sequence { best = run }
            at += covered  // (past the whole run, as QEMU's scan goes on after it)
        }
        return best
    }

    /// Applies `entries` in order, as QEMU replays them; the caller makes them durable and
    /// then empties the log (headers with a zero log GUID).
    static func replay(_ file: ImageFile, _ entries: [Entry]) throws {
        for e in entries {
            let size = try file.size()
            // A log that says the file was longer than it is: the file was cut (QEMU refuses too).
            guard e.flushedFileOffset <= size else {
                throw BlockError.invalid(file: file.path, field: "VHDX log", detail: "an entry needs the file to be \(e.flushedFileOffset) bytes; it is \(size) (truncated)")
            }
            guard e.lastFileOffset <= size + maxGrowth else {
                throw BlockError.invalid(file: file.path, field: "VHDX log", detail: "an entry would grow the file to \(e.lastFileOffset) bytes")
            }
            let limit = max(size, e.lastFileOffset.alignedUp(1 << 20))
            var data = e.data.makeIterator()
            for d in e.descriptors {
                let length = d.zero ? d.zeroLength : UInt64(sector)
                guard d.fileOffset <= limit, length <= limit - d.fileOffset else {
                    throw BlockError.invalid(file: file.path, field: "VHDX log", detail: "a descriptor writes \(length) bytes at \(d.fileOffset), past the file")
                }
                if d.zero {
                    var at = d.fileOffset
                    let zeros = [UInt8](repeating: 0, count: 1 << 20)
                    while at < d.fileOffset + length {
                        let n = min(UInt64(zeros.count), d.fileOffset + length - at)
                        try file.write(Array(zeros[0 ..< Int(n)]), at: at)
                        at += n
                    }
                } else if let payload = data.next() {
                    try file.write(d.leading + payload + d.trailing, at: d.fileOffset)
                }
            }
            // QEMU grows the file to the entry's last offset, rounded up to a MiB, when that
            // is not already a whole MiB.
            if size < e.lastFileOffset, e.lastFileOffset % (1 << 20) != 0 {
                try file.truncate(to: e.lastFileOffset.alignedUp(1 << 20))
            }
        }
    }

    /// One entry writing `tables` (4 KiB sectors at 4 KiB-aligned offsets), as it goes at
    /// the start of an empty log.
    static func encode(_ tables: [(offset: UInt64, bytes: [UInt8])], sequence: UInt64, logGUID: VHDXGUID, fileSize: UInt64) -> [UInt8] {
        let count = tables.count
        let descSectors = (count + 2 + 127) / 128
        var b = [UInt8](repeating: 0, count: (descSectors + count) * sector)
        func put(_ o: Int, _ v: UInt64, _ n: Int) { for i in 0..<n { b[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        b.replaceSubrange(0..<4, with: Array("loge".utf8))
        put(8, UInt64(b.count), 4)
        put(12, 0, 4)                      // tail: this entry, the only one of its sequence
        put(16, sequence, 8)
        put(24, UInt64(count), 4)
        b.replaceSubrange(32..<48, with: logGUID.bytes)
        put(48, fileSize, 8)               // flushed file offset
        put(56, fileSize, 8)               // last file offset
        for (i, t) in tables.enumerated() {
            let d = 64 + i * 32
            b.replaceSubrange(d ..< d + 4, with: Array("desc".utf8))
            b.replaceSubrange(d + 4 ..< d + 8, with: t.bytes[4092..<4096])
            b.replaceSubrange(d + 8 ..< d + 16, with: t.bytes[0..<8])
            put(d + 16, t.offset, 8)
            put(d + 24, sequence, 8)
            let s = (descSectors + i) * sector
            b.replaceSubrange(s ..< s + 4, with: Array("data".utf8))
            put(s + 4, sequence >> 32, 4)
            b.replaceSubrange(s + 8 ..< s + 4092, with: t.bytes[8..<4092])
            put(s + 4092, sequence & 0xFFFF_FFFF, 4)
        }
        put(4, UInt64(crc32c(b, zeroing: 4)), 4)
        return b
    }

    /// Sectors one entry may carry in a log of `logLength` bytes (one sector stays open).
    static func maxSectorsPerEntry(logLength: UInt64) -> Int {
        let total = Int(min(logLength, 64 << 20)) / sector - 1
        return max(1, total - (total + 2 + 127) / 128)
    }
}
