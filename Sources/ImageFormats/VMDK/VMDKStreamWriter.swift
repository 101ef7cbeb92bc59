import BlockEngine

/// Fills a new, empty streamOptimized VMDK (as `VMDKCreate` lays it out, qemu-img's layout:
/// directories and grain tables at the front) with compressed grains, in disk order, as
/// qemu-img convert writes one: each grain is a marker (its first sector, its stream's
/// length) and a zlib stream, padded to a sector, appended to the file; the grain tables
/// (both copies) are written once their grains are on disk, each table when the stream
/// moves past it (only one table's entries are held), then an end-of-stream marker.
public final class VMDKStreamWriter: CompressedClusterSink, @unchecked Sendable {  // one writer thread
    public let file: ImageFile
    let header: VMDKSparseHeader
    /// The entries (sector of each grain's marker) of the grain table being filled.
    private var table: (index: Int, entries: [UInt32])
    private var end: UInt64
    private let gtOffsets: [[UInt64]]  // per directory copy, each table's sector

    public init(path: String) throws {
        file = try ImageFile(path: path, writable: true)
        let h = try VMDKSparseHeader.read(from: file)
        header = h
        guard h.isCompressed, h.hasMarkers, h.compressAlgorithm == 1, h.gdOffset != VMDKSparseHeader.gdAtEnd else {
            throw BlockError.usage("\(path): not an empty streamOptimized VMDK with its grain tables in front")
        }
        var tables: [[UInt64]] = []
        for gd in [h.gdOffset] + (h.hasRedundantGD ? [h.rgdOffset] : []) {
            let bytes = try file.readBytes(count: Int(h.gdEntries) * 4, at: gd * 512, what: "VMDK grain directory")
            tables.append((0 ..< Int(h.gdEntries)).map { UInt64(le32(bytes, $0 * 4)) })
        }
        gtOffsets = tables
        table = (0, [UInt32](repeating: 0, count: Int(h.numGTEsPerGT)))
        end = try file.size().alignedUp(512)
    }

    public var unitBytes: UInt64 { header.grainBytes }

    /// Every grain is stored compressed (zlib, as VMware and qemu-img write them).
    public func compress(_ unit: UnsafeRawBufferPointer, with compressor: DeflateCompressor) -> [UInt8]? {
        compressor.compress(unit, zlib: true)
    }

    public func storeCompressed(_ stream: [UInt8], at guestOffset: UInt64) throws {
        let grain = guestOffset / header.grainBytes, perTable = UInt64(header.numGTEsPerGT)
        guard guestOffset % header.grainBytes == 0, grain / perTable < header.gdEntries, grain / perTable >= UInt64(table.index) else {
            throw BlockError.usage("\(file.path): grain at \(guestOffset) is not a whole grain past those written (a stream is written in order)")
        }
        if grain / perTable != UInt64(table.index) {
            try writeTable()
            table = (Int(grain / perTable), [UInt32](repeating: 0, count: Int(perTable)))
        }
        guard table.entries[Int(grain % perTable)] == 0 else { throw BlockError.usage("\(file.path): grain at \(guestOffset) written twice") }
        guard end / 512 <= UInt64(UInt32.max) else { throw BlockError.unsupported(file: file.path, feature: "a sparse VMDK past 2 TiB of grains") }
        var record = [UInt8](repeating: 0, count: 12)
        put64(&record, 0, guestOffset / 512)
        put32(&record, 8, UInt32(stream.count))
        record += stream
        record += [UInt8](repeating: 0, count: (512 - record.count % 512) % 512)
        try file.write(record, at: end)
        table.entries[Int(grain % perTable)] = UInt32(end / 512)
        end += UInt64(record.count)
    }

    /// The table being filled, in both directory copies (nothing when it names no grain).
    private func writeTable() throws {
        guard table.entries.contains(where: { $0 != 0 }) else { return }
        var bytes = [UInt8](repeating: 0, count: table.entries.count * 4)
        for (k, e) in table.entries.enumerated() { put32(&bytes, k * 4, e) }
        for copy in gtOffsets {
            let sector = copy[table.index]
            // A table goes only where the tables are: between the header and the first grain.
            guard sector != 0, sector < header.overHead, UInt64(bytes.count) <= (header.overHead - sector) * 512 else {
                throw BlockError.invalid(file: file.path, field: "VMDK grain directory", detail: "table \(table.index) at sector \(sector) is not in the table area")
            }
            try file.write(bytes, at: sector * 512)
        }
    }

    /// The last grain table, then the end-of-stream marker; durable.
    public func finish() throws {
        try writeTable()
        try file.write([UInt8](repeating: 0, count: 512), at: end)  // end-of-stream marker
        try file.sync()
    }
}
