import BlockEngine

/// Bochs growing redolog, read-only. A sector is data only when its extent is in the catalog
/// and its bit is set in the extent's bitmap; everything else reads as zeros. Catalog chunks
/// and bitmaps come through the shared table cache; runs of present sectors map to one
/// contiguous host range, so the engine reads them with one pread.
public final class BochsDriver: ImageDriver {
    public let file: ImageFile
    public let info: ImageInfo
    public var readOnlyReason: String? { "Bochs images are always read-only" }
    public let header: BochsHeader

    let catalog: FlatTable
    let bitmaps: TableCache
    let fileSize: UInt64

    public init(file: ImageFile) throws {
        let h = try BochsHeader.read(from: file)
        self.file = file
        header = h
        fileSize = try file.size()
        catalog = FlatTable(file: file, start: 512, entries: UInt64(h.catalog), encoding: .u32LE, fileSize: fileSize)
        let bitmapBytes = Int(h.bitmapSectors * 512)
        bitmaps = TableCache(file: file, tableBytes: bitmapBytes, encoding: .u32LE, capacity: max(16, (4 << 20) / bitmapBytes))
        var details: [(String, String)] = [
            ("type", "\(h.type) / \(h.subtype)"),
            ("version", h.version == BochsHeader.version2 ? "2.0" : "1.0"),
            ("extent size", "\(h.extent)"),
            ("bitmap size", "\(h.bitmap)"),
            ("catalog entries", "\(h.catalog)"),
        ]
        if let ts = h.timestampText { details.append(("timestamp", ts)) }
        info = ImageInfo(format: "bochs", virtualSize: h.diskSize, clusterSize: UInt64(h.extent), details: details)
    }

    /// Catalog entries that point at an extent slot (reads the whole catalog: for `info`).
    public func allocatedExtents() throws -> Int {
        var n = 0
        try FlatTable.forEachEntry(file, start: 512, count: UInt64(header.catalog), encoding: .u32LE, what: "Bochs catalog") { _, e in
            if e != UInt64(BochsHeader.unallocated) { n += 1 }
        }
        return n
    }

    private func catalogEntry(_ i: UInt64) throws -> UInt64 { try catalog.entry(i) }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let ext = UInt64(header.extent)
        let ei = offset / ext
        let end = min(offset + maxLength, (ei + 1) * ext)
        let slot = try catalogEntry(ei)
        if slot == UInt64(BochsHeader.unallocated) {
            // The whole run of unallocated extents that follows, up to maxLength.
            let wanted = (offset + maxLength + ext - 1) / ext - ei
            let run = try catalog.run(of: UInt64(BochsHeader.unallocated), from: ei, limit: wanted)
            return absent(min(offset + maxLength, (ei + max(run, 1)) * ext) - offset)
        }
        let base = try slotBase(ei, slot)
        let dataBase = base + header.bitmapSectors * 512
        let first = (offset % ext) / 512
        let last = (end - 1) % ext / 512
        // Walk the bitmap from the first sector while the bits agree.
        return try bitmaps.withEntries(table: base) { words in
            func present(_ k: UInt64) -> Bool { (words[Int(k / 32)] >> (k % 32)) & 1 != 0 }
            let value = present(first)
            let same: UInt64 = value ? 0xFFFF_FFFF : 0
            var k = first + 1
            while k <= last {
                // Whole words of like bits at a time: a mostly empty extent is 512 words, not 16384 bits.
                if k % 32 == 0 && k + 31 <= last && words[Int(k / 32)] == same { k += 32; continue }
                if present(k) != value { break }
                k += 1
            }
            let runEnd = min(end, (offset / ext) * ext + k * 512)
            return value ? .data(host: dataBase + offset % ext, length: runEnd - offset) : absent(runEnd - offset)
        }
    }

    /// Where the slot catalog entry `ei` names begins (its bitmap, then its data), checked to
    /// lie wholly inside the file.
    func slotBase(_ ei: UInt64, _ slot: UInt64) throws -> UInt64 {
        let base = header.slotsOffset + slot * header.slotBytes
        guard slot < UInt64(header.catalog), base + header.slotBytes <= fileSize else {
            throw BlockError.invalid(file: file.path, field: "catalog entry \(ei)",
                                     detail: "extent slot \(slot) lies outside the \(fileSize)-byte file")
        }
        return base
    }

    /// Sectors the redolog does not hold: the base image's (undoable) or zeros (growing).
    private func absent(_ n: UInt64) -> Mapping { header.isUndoable ? .unallocated(length: n) : .zero(length: n) }

    /// The base image of an undoable redolog: its own name without ".redolog", as Bochs names it.
    public static func basePath(ofRedolog path: String) -> String? {
        path.hasSuffix(BochsHeader.undoableSuffix) && path.count > BochsHeader.undoableSuffix.count
            ? String(path.dropLast(BochsHeader.undoableSuffix.count)) : nil
    }

    public func close() throws {}
}
