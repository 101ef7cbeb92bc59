import BlockEngine
import Synchronization

/// VHDX (Hyper-V's format), dynamic and fixed. The block allocation table holds, per payload
/// block, a state and an offset in MiB, with one sector-bitmap entry after every
/// `chunkRatio` payload entries; it goes through the shared table cache. Block states read
/// as the specification and QEMU say: not present as unallocated; undefined, zero and
/// unmapped as zeros; fully present from the file. Writes: `VHDXBlockAllocation.swift`.
public final class VHDXDriver: ImageAllocating {
    public let file: ImageFile
    public let info: ImageInfo
    public var isWritable: Bool { file.isWritable && !metadata.hasParent }
    public var readOnlyReason: String? { metadata.hasParent ? "differencing VHDX images are served read-only" : nil }
    public let header: VHDXHeader
    public let metadata: VHDXMetadata

    let table: FlatTable
    /// A differencing disk's per-block sector bitmaps (which sectors of a partly present
    /// block are here), cached by their offset in the file.
    let bitmaps: TableCache?
    var bitmapBytesPerBlock: UInt64 { metadata.blockSize / metadata.logicalSectorSize / 8 }
    let structures: MetadataRanges
    let headers: VHDXHeaderUpdate
    static let mib: UInt64 = 1 << 20
    /// Longest run one `map` call assembles.
    static let maxBlocksPerMap = 256

    enum State: UInt64 {
        case notPresent = 0, undefined = 1, zero = 2, unmapped = 3, unmappedV095 = 5, fullyPresent = 6, partiallyPresent = 7
    }

    /// Where the next block goes (QEMU: the file's end rounded up to a MiB) and what the
    /// table write-back still has to do.
    struct Frontier {
        var next: UInt64
        /// Host bytes from here on were never written, so they read as zeros.
        var unwrittenFrom: UInt64
        /// The file must reach here before a table entry names the blocks below it.
        var committedEnd: UInt64
        var presentBlocks: UInt64
        var logSequence: UInt64 = 1
    }
    let frontier: Mutex<Frontier>
    let preallocator: Preallocator?

    /// `note`: told what a writable open did (a log replayed).
    public init(file: ImageFile, note: ((String) -> Void)? = nil) throws {
        var h = try VHDXHeader.read(from: file)
        // A log to replay: replayed on a writable open, refused on a read-only one, as QEMU does.
        let pending = try VHDXLog.activeSequence(file, header: h)
        if !pending.isEmpty {
            guard file.isWritable else {
                throw BlockError.unsupported(file: file.path, feature: "opening read-only a VHDX whose log needs to be replayed (a crash while it was written); "
                                             + "open it writable once (rawmount mount without -r, or `qemu-img check -r all`) to replay it")
            }
            try VHDXLog.replay(file, pending)
            try file.sync()
            try VHDXHeaderUpdate(file: file, header: h).update(logGUID: VHDXGUID(bytes: [UInt8](repeating: 0, count: 16)))
            note?("replayed \(pending.count) log \(pending.count == 1 ? "entry" : "entries") left by a crash")
            h = try VHDXHeader.read(from: file)
        }
        let m = try VHDXMetadata.read(from: file, header: h)
        let entries = m.tableEntries
        guard entries * 8 <= h.batLength else {
            throw BlockError.invalid(file: file.path, field: "VHDX block allocation table",
                                     detail: "\(entries) entries do not fit its \(h.batLength)-byte region")
        }
        self.file = file
        header = h
        metadata = m
        let fileSize = try file.size()
        var ranges: [MetadataRanges.Range] = [
            .init(start: 0, length: Self.mib, what: "the header section"),
            .init(start: h.batOffset, length: h.batLength, what: "the block allocation table"),
            .init(start: h.metadataOffset, length: h.metadataLength, what: "the metadata region"),
        ]
        if h.logLength > 0 { ranges.append(.init(start: h.logOffset, length: h.logLength, what: "the log")) }
        structures = try MetadataRanges(ranges, file: file.path, fixed: true)  // headers, log, table, metadata never move
        // Every present block must lie inside the file, or QEMU calls the image truncated;
        // the last one only up to the disk's end (qemu-img makes fixed images that end there).
        var present: UInt64 = 0
        let group = m.chunkRatio + 1
        try FlatTable.forEachEntry(file, start: h.batOffset, count: entries, encoding: .u64LE, what: "VHDX block allocation table") { i, e in
            if i % group == m.chunkRatio {
                // A sector-bitmap block (1 MiB; only a differencing disk uses them).
                guard m.hasParent, e & 7 == State.fullyPresent.rawValue else { return }
                let offset = (e >> 20) * Self.mib
                guard offset >= Self.mib, offset <= fileSize, Self.mib <= fileSize - offset else {
                    throw BlockError.invalid(file: file.path, field: "VHDX block allocation table entry \(i)",
                                             detail: "a sector bitmap block at \(offset) lies outside the \(fileSize)-byte file")
                }
                return
            }
            guard e & 7 == State.fullyPresent.rawValue || e & 7 == State.partiallyPresent.rawValue else { return }
            present += 1
            let offset = (e >> 20) * Self.mib
            let block = i - i / group
            let needed = block * m.blockSize < m.virtualSize ? min(m.blockSize, m.virtualSize - block * m.blockSize) : m.blockSize
            guard offset <= fileSize, needed <= fileSize - offset else {
                throw BlockError.invalid(file: file.path, field: "VHDX block allocation table entry \(i)",
                                         detail: "a block at \(offset) runs past the end of the \(fileSize)-byte file (the image was truncated)")
            }
        }
        let end = max(fileSize, ranges.map(\.end).max() ?? 0).alignedUp(Self.mib)
        frontier = Mutex(Frontier(next: end, unwrittenFrom: fileSize, committedEnd: 0, presentBlocks: present))
        headers = VHDXHeaderUpdate(file: file, header: h)
        bitmaps = m.hasParent ? TableCache(file: file, tableBytes: Int(m.blockSize / m.logicalSectorSize / 8), encoding: .u64LE,
                                           capacity: max(64, Int((4 << 20) / (m.blockSize / m.logicalSectorSize / 8)))) : nil
        preallocator = file.isWritable ? Preallocator(file: file) : nil
        info = ImageInfo(format: "vhdx", virtualSize: m.virtualSize, clusterSize: m.blockSize, details: [
            ("block size", "\(m.blockSize)"),
            ("logical sector size", "\(m.logicalSectorSize)"),
            ("physical sector size", "\(m.physicalSectorSize)"),
            ("blocks", "\(present) of \(m.dataBlocks) present"),
            ("header sequence", "\(h.sequenceNumber) (header \(h.current + 1))"),
        ])
        // Table sectors reach the file through the log (`VHDXBlockAllocation.swift`), in
        // whole 4 KiB chunks that stay inside the table's region.
        let late = LateBarrier(), journal = LateHook<[(offset: UInt64, bytes: [UInt8])]>()
        table = FlatTable(file: file, start: h.batOffset, entries: entries, encoding: .u64LE, fileSize: fileSize,
                          regionEnd: h.batOffset + h.batLength, beforeWriteBack: { try late() }, journal: { try journal($0) })
        late.body = { [unowned self] _ in try self.coverCommittedBlocks() }
        journal.body = { [unowned self] in try self.writeThroughLog($0) }
        // A writable open updates both headers (a new file-write GUID), as QEMU's does.
        if isWritable { try headers.update() }
    }

    public var allocatedBytesHint: UInt64? { min(frontier.withLock { $0.presentBlocks } * metadata.blockSize, info.virtualSize) }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let bs = metadata.blockSize, ratio = metadata.chunkRatio
        // One group of payload entries per call: inside it, block k's entry is k + k / ratio.
        let group = offset / bs / ratio
        let block = offset / bs
        // Inside one block (every small guest request): its entry alone, one cache lookup.
        if (offset + maxLength - 1) / bs == block {
            return try classify(try table.entry(block + group), block: block, group: group, pos: offset, length: maxLength)
        }
        let groupEnd = min(offset + maxLength, (group + 1) * ratio * bs)
        return try table.mapRun(from: offset, to: groupEnd, unit: bs, maxPieces: Self.maxBlocksPerMap, skip: group) { e, block, pos, n in
            try classify(e, block: block, group: group, pos: pos, length: n)
        }
    }

    /// Guest bytes `[pos, pos+n)` of payload `block` (in chunk `group`), whose entry is `e`.
    private func classify(_ e: UInt64, block: UInt64, group: UInt64, pos: UInt64, length n: UInt64) throws -> Mapping {
        let bs = metadata.blockSize
        switch State(rawValue: e & 7) {
        case .notPresent: return .unallocated(length: n)
        // (Undefined and unmapped may read as zeros, which QEMU returns, also in a
        // differencing disk: the specification allows zeros, not the parent's data.)
        case .undefined, .zero, .unmapped, .unmappedV095: return .zero(length: n)
        case .partiallyPresent where bitmaps != nil:
            return try partlyPresent(e, block: block, group: group, pos: pos, length: n)
        case .fullyPresent:
            let data = (e >> 20) * Self.mib
            guard data >= Self.mib else {
                throw BlockError.invalid(file: file.path, field: "VHDX block allocation table entry for block \(block)",
                                         detail: "block offset \(data) lies in the header section")
            }
            if let m = structures.overlap(data, bs) {
                throw BlockError.invalid(file: file.path, field: "VHDX block allocation table entry for block \(block)",
                                         detail: "the block at \(data) lies in \(m.what) at \(m.start)")
            }
            return .data(host: data + pos - block * bs, length: n)
        case .partiallyPresent, nil:
            throw BlockError.invalid(file: file.path, field: "VHDX block allocation table entry for block \(block)",
                                     detail: "state \(e & 7) is not a payload block state of a disk without a parent")
        }
    }

    /// A partly present block of a differencing disk: a run of sectors from `pos` that are
    /// all here (data) or all the parent's, as the block's sector bitmap says (bit n of the
    /// bitmap, least significant first, is sector n).
    private func partlyPresent(_ e: UInt64, block: UInt64, group: UInt64, pos: UInt64, length n: UInt64) throws -> Mapping {
        let bs = metadata.blockSize, ratio = metadata.chunkRatio, lss = metadata.logicalSectorSize
        let sb = try table.entry(group * (ratio + 1) + ratio)
        guard sb & 7 == State.fullyPresent.rawValue, (sb >> 20) >= 1 else {
            throw BlockError.invalid(file: file.path, field: "VHDX sector bitmap entry for block \(block)",
                                     detail: "a partly present block needs a present sector bitmap block (state \(sb & 7))")
        }
        let data = (e >> 20) * Self.mib
        guard data >= Self.mib, structures.overlap(data, bs) == nil else {
            throw BlockError.invalid(file: file.path, field: "VHDX block allocation table entry for block \(block)",
                                     detail: "the block at \(data) lies in the header section or on the image's structures")
        }
        let at = (sb >> 20) * Self.mib + (block % ratio) * bitmapBytesPerBlock
        return try bitmaps!.withBytes(table: at) { bits in
            let inBlock = pos - block * bs
            let first = inBlock / lss, last = (inBlock + n - 1) / lss
            func here(_ s: UInt64) -> Bool { bits[Int(s / 8)] & (1 << UInt8(s % 8)) != 0 }
            let kind = here(first)
            var end = first + 1
            while end <= last && here(end) == kind { end += 1 }
            let length = min(n, end * lss - inBlock)
            return kind ? .data(host: data + inBlock, length: length) : .unallocated(length: length)
        }
    }
}
