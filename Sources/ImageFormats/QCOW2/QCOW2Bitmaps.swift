import BlockEngine

/// One entry of the bitmap directory.
public struct QCOW2Bitmap: Sendable {
    public var name: String
    /// The name as stored (kept byte for byte when the directory is written again).
    var nameBytes: [UInt8]
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
    var granularityBits: UInt8 { UInt8(granularity.trailingZeroBitCount) }
}

/// The on-disk side of persistent dirty bitmaps: the directory read with QEMU's limits,
/// bitmap data loaded into a `DirtyBitmap`, and the directory serialized again.
public enum QCOW2Bitmaps {
    static let flagInUse: UInt32 = 1 << 0
    static let flagAuto: UInt32 = 1 << 1
    static let maxDirectoryBytes: UInt64 = 1024 * 65535
    static let maxBitmaps: UInt32 = 65535
    static let maxNameBytes = 1023
    static let maxTableEntries: UInt32 = 0x800_0000
    /// QEMU's limit on a bitmap's serialized size (its table times the cluster size).
    static let maxBitmapBytes: UInt64 = 512 << 20
    static let tableReserved: UInt64 = 0xFF00_0000_0000_01FE
    static let tableOffsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00

    /// Table entries a bitmap of this granularity needs for the disk (one per cluster of
    /// its LSB-first serialization).
    static func tableEntries(diskSize: UInt64, granularity: UInt64, clusterSize: UInt64) -> UInt64 {
        let bytes = ((diskSize + granularity - 1) / granularity + 7) / 8
        return (bytes + clusterSize - 1) / clusterSize
    }

    /// Why QEMU would not create a bitmap of this granularity and name here (nil: it would).
    static func creationProblem(name: String, granularity: UInt64, header h: QCOW2Header) -> String? {
        guard granularity & (granularity - 1) == 0, (512 ... (1 << 31)).contains(granularity) else {
            return "granularity \(granularity) must be a power of two from 512 B to 2 GiB"
        }
        guard !name.isEmpty, name.utf8.count <= maxNameBytes else { return "a bitmap name has 1 to \(maxNameBytes) bytes" }
        let entries = tableEntries(diskSize: h.size, granularity: granularity, clusterSize: h.clusterSize)
        if entries * h.clusterSize > maxBitmapBytes || entries > UInt64(maxTableEntries) {
            return "the bitmap would take more than \(maxBitmapBytes >> 20) MiB; use a larger granularity"
        }
        return nil
    }

    /// The bitmap directory with QEMU's limits (count, entries filling the directory exactly,
    /// names 1 to 1023 bytes and unique, granularity 512 B to 2 GiB, type 1, no reserved
    /// flags or extra data, table size within limits and covering the disk unless in use),
    /// and the directory bytes.
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
        var names = Set<String>()
        for n in 0..<h.bitmapCount {
            guard entry + 24 <= dir.count else { throw bad("entry \(n + 1) runs past the directory's end") }
            let nameSize = Int(dir[entry + 18]) << 8 | Int(dir[entry + 19]), extra = Int(be32(dir, entry + 20))
            let next = entry + (24 + extra + nameSize + 7) / 8 * 8
            guard next <= dir.count, nameSize > 0, nameSize <= maxNameBytes else { throw bad("entry \(n + 1) has a bad name size or runs past the directory's end") }
            let name = String(decoding: dir[(entry + 24 + extra) ..< (entry + 24 + extra + nameSize)], as: UTF8.self)
            func refuse(_ why: String) -> BlockError { bad("bitmap '\(name)' \(why)") }
            let flags = be32(dir, entry + 12), type = dir[entry + 16], bits = UInt64(dir[entry + 17])
            let tableOffset = be64(dir, entry), tableEntries = be32(dir, entry + 8)
            guard extra == 0 else { throw refuse("has \(extra) bytes of extra data (QEMU supports none)") }
            guard type == 1 else { throw refuse("has type \(type) (only 1, dirty tracking, exists)") }
            guard (9...31).contains(bits) else { throw refuse("has granularity 2^\(bits) (QEMU allows 512 B to 2 GiB)") }
            guard flags & ~(flagInUse | flagAuto) == 0 else { throw refuse("sets reserved flag bits 0x\(String(flags, radix: 16))") }
            guard tableOffset != 0, tableOffset % h.clusterSize == 0, tableEntries > 0, tableEntries <= maxTableEntries,
                  UInt64(tableEntries) * h.clusterSize <= maxBitmapBytes else {
                throw refuse("has a table of \(tableEntries) entries at \(tableOffset) (QEMU needs a cluster-aligned table within its \(maxBitmapBytes >> 20) MiB limit)")
            }
            if flags & flagInUse == 0 && h.size > (UInt64(tableEntries) * h.clusterSize * 8) << bits {
                throw refuse("has a table too small for the \(h.size)-byte disk")
            }
            guard names.insert(name).inserted else { throw bad("two bitmaps are named '\(name)'") }
            list.append(QCOW2Bitmap(name: name, nameBytes: Array(dir[(entry + 24 + extra) ..< (entry + 24 + extra + nameSize)]), granularity: 1 << bits, flags: flags, tableOffset: tableOffset,
                                    tableEntries: tableEntries, entryOffset: entry))
            entry = next
        }
        guard entry == dir.count else { throw bad("its \(h.bitmapCount) entries end at byte \(entry) of \(dir.count)") }
        // Each bitmap's table is its own (QEMU calls a shared or misplaced one corruption):
        // 65535 bitmaps sharing one table would each be stored anew at unmount.
        let dirRange = (start: h.bitmapDirectoryOffset, end: h.bitmapDirectoryOffset + UInt64(dir.count).alignedUp(h.clusterSize), name: "")
        let tables = list.map { b -> (start: UInt64, end: UInt64, name: String) in
            let (end, over) = b.tableOffset.addingReportingOverflow((UInt64(b.tableEntries) * 8).alignedUp(h.clusterSize))
            return (b.tableOffset, over ? UInt64.max : end, b.name)
        }
            .sorted { $0.start < $1.start }
        for (a, b) in zip(tables, tables.dropFirst()) where b.start < a.end {
            throw bad("bitmaps '\(a.name)' and '\(b.name)' share table clusters (at \(b.start))")
        }
        if let t = tables.first(where: { $0.start < dirRange.end && dirRange.start < $0.end }) {
            throw bad("the table of bitmap '\(t.name)' lies in the bitmap directory")
        }
        return (list, dir)
    }

    /// The image's bitmaps, for `rawmount info`.
    public static func list(_ file: ImageFile, header h: QCOW2Header) throws -> [QCOW2Bitmap] {
        try readDirectory(file, header: h, fileSize: try file.size()).bitmaps
    }

    /// A consistent bitmap's bits, and the clusters its table and data occupy (freed once a
    /// new copy is stored). Entries are checked as QEMU checks them; the table must have
    /// exactly the entries the disk needs.
    static func load(_ b: QCOW2Bitmap, file: ImageFile, header h: QCOW2Header, fileSize: UInt64) throws -> (bits: DirtyBitmap, clusters: [HostRange]) {
        func bad(_ detail: String) -> BlockError { .invalid(file: file.path, field: "bitmap '\(b.name)'", detail: detail) }
        let cs = h.clusterSize
        let need = tableEntries(diskSize: h.size, granularity: b.granularity, clusterSize: cs)
        guard UInt64(b.tableEntries) == need else { throw bad("its table has \(b.tableEntries) entries; the disk needs \(need)") }
        let bits = DirtyBitmap(granularity: b.granularity, diskSize: h.size)
        var clusters: [HostRange] = []
        let perCluster = cs * 8
        let table = try forEachTableEntry(b, file: file, header: h, fileSize: fileSize) { i, e in
            let offset = e & tableOffsetMask
            guard e & tableReserved == 0, offset == 0 || (e & 1 == 0 && offset % cs == 0) else {
                throw bad("table entry \(i) is 0x\(String(e, radix: 16)) (reserved bits set or an unaligned cluster)")
            }
            if offset == 0 {
                if e & 1 != 0 { bits.setGranules(i * perCluster, (i + 1) * perCluster, to: true) }
                return
            }
            guard offset <= fileSize, cs <= fileSize - offset else { throw bad("table entry \(i) names cluster \(offset) outside the \(fileSize)-byte file") }
            let bytes = try file.readBytes(count: Int(cs), at: offset, what: "data of bitmap '\(b.name)'")
            bits.merge(words: stride(from: 0, to: bytes.count, by: 8).map { le64(bytes, $0) }, from: i * perCluster)
            clusters.append(HostRange(offset: offset, length: cs))
        }
        return (bits, [table] + clusters)
    }

    /// Calls `body(index, entry)` for every entry of the bitmap's table (which must lie inside
    /// the file; its size QEMU's limits bound in `readDirectory`) and returns the clusters the
    /// table itself takes.
    static func forEachTableEntry(_ b: QCOW2Bitmap, file: ImageFile, header h: QCOW2Header, fileSize: UInt64,
                                  _ body: (UInt64, UInt64) throws -> Void) throws -> HostRange {
        let bytes = UInt64(b.tableEntries) * 8
        guard b.tableOffset <= fileSize, bytes <= fileSize - b.tableOffset else {
            throw BlockError.truncated(file: file.path, what: "table of bitmap '\(b.name)'", offset: b.tableOffset, needed: bytes, fileSize: fileSize)
        }
        try FlatTable.forEachEntry(file, start: b.tableOffset, count: UInt64(b.tableEntries), encoding: .u64BE, fileSize: fileSize,
                                   what: "qcow2 bitmap table", body)
        return HostRange(offset: b.tableOffset, length: bytes.alignedUp(h.clusterSize))
    }

    /// Bytes one directory entry takes (24-byte header, the name, padding to 8).
    static func entryBytes(nameBytes: Int) -> Int { (24 + nameBytes + 7) / 8 * 8 }

    /// Directory bytes for these entries (in this order; offsets as given).
    static func serializeDirectory(_ bitmaps: [QCOW2Bitmap]) -> [UInt8] {
        var dir: [UInt8] = []
        for b in bitmaps {
            let name = b.nameBytes
            var e = [UInt8](repeating: 0, count: entryBytes(nameBytes: name.count))
            put64be(&e, 0, b.tableOffset)
            put32be(&e, 8, b.tableEntries)
            put32be(&e, 12, b.flags)
            e[16] = 1
            e[17] = b.granularityBits
            e[18] = UInt8(name.count >> 8); e[19] = UInt8(name.count & 0xFF)
            e.replaceSubrange(24 ..< 24 + name.count, with: name)
            dir += e
        }
        return dir
    }

    /// Flags every bitmap in use in place and makes it durable, as QEMU does on a writable
    /// open before the first write, so a crash leaves them marked inconsistent.
    static func markInUse(_ file: ImageFile, header h: QCOW2Header, bitmaps: [QCOW2Bitmap], directory: [UInt8]) throws {
        var dir = directory
        for b in bitmaps where !b.inUse { put32be(&dir, b.entryOffset + 12, b.flags | flagInUse) }
        guard dir != directory else { return }
        try file.write(dir, at: h.bitmapDirectoryOffset)
        try file.sync()
    }
}
