import BlockEngine

/// Where every chunk of an EWF set is: the table sections of all segments, in order, each
/// covering the next run of chunks. Only the tables' 24-byte headers are read at open; their
/// entries come through the shared table cache, checked against the table's Adler-32 (or
/// read from its table2 copy when that fails), when a chunk of theirs is first read.
struct EWFChunkTables: Sendable {
    struct Table: Sendable {
        var segment: Int
        /// Where the entries start (after the 24-byte table header).
        var entries: UInt64
        var count: Int
        /// What entry offsets are relative to (0 before EnCase 6: the file's start).
        var base: UInt64
        var firstChunk: UInt64
        /// Whether an Adler-32 of the entries follows them (every layout but the original
        /// specification's, which stores chunks right after the entries).
        var footer: Bool
        /// The table2 copy's entries, if the segment has one.
        var mirror: UInt64?
        /// The file range the chunks of this table lie in (the sectors section before it,
        /// or, in the original layout, the rest of the table section).
        var dataStart: UInt64
        var dataEnd: UInt64
    }

    private(set) var tables: [Table] = []
    var chunksCovered: UInt64 { tables.last.map { $0.firstChunk + UInt64($0.count) } ?? 0 }

    /// More entries than this in one table are refused (EnCase writes at most 65534).
    static let maxEntries = 1 << 20

    /// Reads the table headers of one segment's sections.
    mutating func add(segment: Int, file: ImageFile, sections: [EWFSection]) throws {
        var sectors: EWFSection?
        var pending: Table?  // a table whose table2 copy may follow
        func finish() { if let t = pending { tables.append(t); pending = nil } }
        for (i, s) in sections.enumerated() {
            switch s.type {
            case "sectors":
                finish()
                sectors = s
            case "table", "table2":
                let head = try readHeader(s, file: file)
                if s.type == "table2" {
                    // Only ever a copy of the table before it, used when that table's entries
                    // are damaged; one that matches no table maps nothing (a stray copy must
                    // not shift every chunk after it).
                    if var t = pending, t.mirror == nil, let head, head.count == t.count, head.base == t.base {
                        t.mirror = s.dataStart + 24
                        pending = t
                    }
                    continue
                }
                finish()
                guard let head else {
                    // A damaged header: its table2 copy stands in for it, but only the copy
                    // right after it (a later table's copy would map other chunks here).
                    if s.type == "table", i + 1 < sections.count, sections[i + 1].type == "table2",
                       let h = try readHeader(sections[i + 1], file: file) {
                        let copy = sections[i + 1]
                        pending = try makeTable(head: h, section: copy, sectors: sectors, segment: segment, file: file)
                        pending!.mirror = nil
                        continue
                    }
                    throw BlockError.invalid(file: file.path, field: "EWF table section at \(s.offset)",
                                             detail: "header checksum mismatch and no intact table2 copy (damaged)")
                }
                if head.count == 0 { continue }
                pending = try makeTable(head: head, section: s, sectors: sectors, segment: segment, file: file)
            default:
                finish()
            }
        }
        finish()
    }

    /// A table header (entry count, base offset), or nil when its checksum fails.
    private func readHeader(_ s: EWFSection, file: ImageFile) throws -> (count: Int, base: UInt64)? {
        guard s.dataLength >= 24 else {
            throw BlockError.invalid(file: file.path, field: "EWF \(s.type) section at \(s.offset)", detail: "too short for a table header")
        }
        let h = try file.readBytes(count: 24, at: s.dataStart, what: "EWF table header")
        guard ewfAdler32(h[0..<20]) == le32(h, 20) else { return nil }
        let count = Int(le32(h, 0))
        guard count <= Self.maxEntries, UInt64(count) * 4 <= s.dataLength - 24 else {
            throw BlockError.invalid(file: file.path, field: "EWF \(s.type) section at \(s.offset)",
                                     detail: "\(count) entries do not fit in its \(s.dataLength) bytes")
        }
        return (count, le64(h, 8))
    }

    private func makeTable(head: (count: Int, base: UInt64), section s: EWFSection, sectors: EWFSection?,
                           segment: Int, file: ImageFile) throws -> Table {
        let entriesEnd = s.dataStart + 24 + UInt64(head.count) * 4
        // Chunks in a sectors section before the table, or (original layout) after the entries.
        let inPlace = sectors == nil
        let dataStart = inPlace ? entriesEnd : sectors!.dataStart
        let dataEnd = inPlace ? s.dataEnd : sectors!.dataEnd
        let footer = !inPlace && s.dataEnd - entriesEnd >= 4
        guard head.base <= dataEnd else {
            throw BlockError.invalid(file: file.path, field: "EWF table section at \(s.offset)",
                                     detail: "base offset \(head.base) lies past its chunk data")
        }
        return Table(segment: segment, entries: s.dataStart + 24, count: head.count, base: head.base, firstChunk: chunksCovered,
                     footer: footer, mirror: nil, dataStart: dataStart, dataEnd: dataEnd)
    }

    /// The table holding chunk `chunk`.
    func tableIndex(of chunk: UInt64) -> Int {
        tables.partitionIndex { $0.firstChunk > chunk } - 1
    }

    /// Bytes a cache slot holds: the largest table's entries.
    var tableBytes: Int { max(4, (tables.map(\.count).max() ?? 1) * 4) }

    /// The entries of table `index`, checked, padded to `tableBytes` (the cache's loader).
    func load(_ index: Int, files: [ImageFile], tableBytes: Int) throws -> [UInt8] {
        let t = tables[index]
        let file = files[t.segment]
        let n = t.count * 4
        func read(_ at: UInt64) throws -> [UInt8]? {
            let bytes = try file.readBytes(count: n + (t.footer ? 4 : 0), at: at, what: "EWF table entries")
            if t.footer && ewfAdler32(bytes[0..<n]) != le32(bytes, n) { return nil }
            return bytes
        }
        guard var bytes = try read(t.entries) ?? (t.mirror.map { try read($0) } ?? nil) else {
            throw BlockError.invalid(file: file.path, field: "EWF table at \(t.entries - 24)",
                                     detail: "the entries' checksum fails" + (t.mirror == nil ? " (damaged; no table2 copy)" : ", and in its table2 copy (damaged)"))
        }
        bytes.removeLast(bytes.count - n)
        bytes.append(contentsOf: repeatElement(0, count: tableBytes - n))
        return bytes
    }
}
