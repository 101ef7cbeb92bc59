import BlockEngine
import Synchronization

/// VHD (QEMU's `vpc`). Fixed: the guest disk is the file's bytes before its footer, written
/// in place. Dynamic: the block allocation table (big-endian sector numbers, 0xFFFFFFFF for
/// a block not here) names, per block, a sector bitmap followed by the block's data; as
/// QEMU does, a block present is read whole (its bitmap is not consulted) and a block not
/// here reads as zeros. The table goes through the shared table cache; new blocks are
/// appended where the footer is (`VHDBlockAllocation.swift`).
public final class VHDDriver: ImageAllocating {
    public let file: ImageFile
    public let info: ImageInfo
    public var isWritable: Bool { file.isWritable && !footer.isDifferencing }
    public var readOnlyReason: String? { footer.isDifferencing ? "differencing VHD images are served read-only" : nil }
    public let footer: VHDFooter
    public let dynamic: VHDDynamicHeader?

    let table: FlatTable?
    /// A differencing disk's sector bitmaps (which sectors of a present block are here; the
    /// others are the parent's), cached by their offset.
    let bitmaps: TableCache?
    let metadata: MetadataRanges
    /// Fixed: where the guest's bytes end (the footer follows).
    let dataEnd: UInt64
    static let notPresent: UInt64 = 0xFFFF_FFFF
    /// Longest run one `map` call assembles.
    static let maxBlocksPerMap = 256

    /// Where the next block goes and what is not yet durable (see `VHDBlockAllocation.swift`).
    struct Frontier {
        /// QEMU's free_data_block_offset: the next block's sector bitmap, and where the
        /// footer belongs (after every block and every metadata structure).
        var free: UInt64
        /// Host bytes from here on were never written, so they read as zeros.
        var unwrittenFrom: UInt64
        /// Sector bitmaps of linked blocks not yet written, and whether the footer must move.
        var pendingBitmaps: [UInt64] = []
        var footerMoved = false
        var presentBlocks: UInt64
    }
    let frontier: Mutex<Frontier>
    let preallocator: Preallocator?
    /// Before table chunks are written: data, then block bitmaps and the moved footer.
    private let framesFirst = LateBarrier()

    public init(file: ImageFile) throws {
        let f = try VHDFooter.read(from: file)
        self.file = file
        footer = f
        let fileSize = try file.size()
        var details: [(String, String)] = [("subformat", f.kind == .fixed ? "fixed" : f.isDifferencing ? "differencing" : "dynamic"),
                                           ("creator", f.creatorApp.escapingControls)]
        guard f.kind == .dynamic else {
            dynamic = nil; table = nil; bitmaps = nil
            dataEnd = fileSize - UInt64(VHDFooter.size)
            metadata = try MetadataRanges([.init(start: dataEnd, length: UInt64(VHDFooter.size), what: "the footer")], file: file.path, fixed: true)
            frontier = Mutex(Frontier(free: dataEnd, unwrittenFrom: fileSize, presentBlocks: 0))
            preallocator = nil
            info = ImageInfo(format: "vpc", virtualSize: f.virtualSize, clusterSize: 512, details: details, hasClusters: false)
            return
        }
        let h = try VHDDynamicHeader.read(from: file, footer: f)
        dynamic = h
        dataEnd = 0
        bitmaps = f.isDifferencing ? TableCache(file: file, tableBytes: Int(h.bitmapBytes), encoding: .u32BE,
                                                capacity: max(64, Int((4 << 20) / h.bitmapBytes))) : nil
        let structures: [MetadataRanges.Range] = [
            .init(start: 0, length: UInt64(VHDFooter.size), what: "the footer copy"),
            .init(start: f.dataOffset, length: VHDDynamicHeader.size, what: "the dynamic header"),
            .init(start: h.tableOffset, length: h.tableRegionBytes, what: "the block allocation table"),
        ]
        metadata = try MetadataRanges(structures, file: file.path, fixed: true)  // new blocks go past them; they never move
        // Every block the table names must lie inside the file, or QEMU calls the image
        // truncated and refuses it; one pass over the table (its size is bounded by the file).
        // New blocks go after every block and every structure (QEMU only looks past the table).
        var present: UInt64 = 0, end: UInt64 = structures.map(\.end).max() ?? 0
        try FlatTable.forEachEntry(file, start: h.tableOffset, count: h.maxTableEntries, encoding: .u32BE, what: "VHD block allocation table") { _, e in
            guard e != Self.notPresent else { return }
            present += 1
            end = max(end, e * 512 + h.bitmapBytes + h.blockSize)
        }
        guard end <= fileSize || present == 0 else {
            throw BlockError.invalid(file: file.path, field: "VHD block allocation table",
                                     detail: "a block ends at \(end), past the end of the \(fileSize)-byte file (the image was truncated)")
        }
        frontier = Mutex(Frontier(free: end.alignedUp(512), unwrittenFrom: fileSize, presentBlocks: present))
        preallocator = file.isWritable ? Preallocator(file: file) : nil
        details += [("block size", "\(h.blockSize)"), ("blocks", "\(present) of \(h.maxTableEntries) present")]
        info = ImageInfo(format: "vpc", virtualSize: f.virtualSize, clusterSize: h.blockSize, details: details)
        // The table is written in whole chunks, so they stay inside its own (sector-padded) region.
        table = FlatTable(file: file, start: h.tableOffset, entries: h.maxTableEntries, encoding: .u32BE, fileSize: fileSize,
                          regionEnd: h.tableOffset + h.tableRegionBytes, beforeWriteBack: { [framesFirst] in try framesFirst() })
        framesFirst.body = { [unowned self] _ in try self.writeBlockFrames() }
    }

    public var allocatedBytesHint: UInt64? {
        guard let dynamic else { return info.virtualSize }
        return min(frontier.withLock { $0.presentBlocks } * dynamic.blockSize, info.virtualSize)
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        guard let table, let h = dynamic else {
            // Fixed: the file's bytes; past them (a size larger than the data), zeros.
            guard offset < dataEnd else { return .zero(length: maxLength) }
            return .data(host: offset, length: min(maxLength, dataEnd - offset))
        }
        // Inside one block (every small guest request): its entry alone, one cache lookup.
        let block = offset / h.blockSize
        if (offset + maxLength - 1) / h.blockSize == block, block < h.maxTableEntries {
            return try classify(try table.entry(block), block: block, pos: offset, length: maxLength, header: h)
        }
        return try table.mapRun(from: offset, to: offset + maxLength, unit: h.blockSize, maxPieces: Self.maxBlocksPerMap) { e, block, pos, n in
            try classify(e, block: block, pos: pos, length: n, header: h)
        }
    }

    /// Guest bytes `[pos, pos+n)` of `block`, whose table entry is `e`.
    private func classify(_ e: UInt64, block: UInt64, pos: UInt64, length n: UInt64, header h: VHDDynamicHeader) throws -> Mapping {
        // A block not here: the parent's for a differencing disk; else zeros, which QEMU
        // reports as zero (present), so `map` agrees with qemu-img map.
        guard e != Self.notPresent else { return bitmaps != nil ? .unallocated(length: n) : .zero(length: n) }
        let data = e * 512 + h.bitmapBytes
        // A table entry naming the table or a header would let guest writes rewrite them.
        if let m = metadata.overlap(data, h.blockSize) {
            throw BlockError.invalid(file: file.path, field: "VHD block allocation table entry \(block)",
                                     detail: "the block's data at \(data) lies in \(m.what) at \(m.start)")
        }
        guard let bitmaps else { return .data(host: data + pos - block * h.blockSize, length: n) }
        // Differencing: the sector bitmap says, sector by sector, here or the parent's.
        return try bitmaps.withBytes(table: e * 512) { bits in
            let first = (pos - block * h.blockSize) / 512, last = (pos - block * h.blockSize + n - 1) / 512
            func here(_ sector: UInt64) -> Bool { bits[Int(sector / 8)] & (0x80 >> UInt8(sector % 8)) != 0 }
            let kind = here(first)
            var end = first + 1
            while end <= last && here(end) == kind { end += 1 }
            let length = min(n, (block * h.blockSize + end * 512) - pos)
            return kind ? .data(host: data + pos - block * h.blockSize, length: length) : .unallocated(length: length)
        }
    }

}
