import BlockEngine

/// VHDX (Hyper-V's format), dynamic and fixed, read-only for now. The block allocation
/// table holds, per payload block, a state and an offset in MiB, with one sector-bitmap
/// entry after every `chunkRatio` payload entries; it goes through the shared table cache.
/// Block states read as the specification and QEMU say: not present as unallocated;
/// undefined, zero and unmapped as zeros; fully present from the file.
public final class VHDXDriver: ImageDriver {
    public let file: ImageFile
    public let info: ImageInfo
    public var readOnlyReason: String? { "writing VHDX images is not supported yet" }
    public let header: VHDXHeader
    public let metadata: VHDXMetadata

    let table: FlatTable
    let structures: MetadataRanges
    let presentBlocks: UInt64
    static let mib: UInt64 = 1 << 20
    /// Longest run one `map` call assembles.
    static let maxBlocksPerMap = 256

    enum State: UInt64 {
        case notPresent = 0, undefined = 1, zero = 2, unmapped = 3, fullyPresent = 6, partiallyPresent = 7
    }

    public init(file: ImageFile) throws {
        let h = try VHDXHeader.read(from: file)
        if try VHDXLog.needsReplay(file, header: h) {
            throw BlockError.unsupported(file: file.path, feature: "VHDX image with a log that needs to be replayed (a crash while it was written); "
                                         + "rawmount does not replay VHDX logs yet: `qemu-img check -r all` on a copy replays it")
        }
        let m = try VHDXMetadata.read(from: file, header: h)
        guard !m.hasParent else {
            throw BlockError.unsupported(file: file.path, feature: "differencing VHDX images (changed sectors over a parent): not read yet")
        }
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
        structures = try MetadataRanges(ranges, file: file.path)
        // Every present block must lie inside the file, or QEMU calls the image truncated.
        var present: UInt64 = 0
        let group = m.chunkRatio + 1
        try FlatTable.forEachEntry(file, start: h.batOffset, count: entries, encoding: .u64LE, what: "VHDX block allocation table") { i, e in
            guard i % group != m.chunkRatio, e & 7 == State.fullyPresent.rawValue || e & 7 == State.partiallyPresent.rawValue else { return }
            present += 1
            let offset = (e >> 20) * Self.mib
            guard offset <= fileSize, m.blockSize <= fileSize - offset else {
                throw BlockError.invalid(file: file.path, field: "VHDX block allocation table entry \(i)",
                                         detail: "a block at \(offset) runs past the end of the \(fileSize)-byte file (the image was truncated)")
            }
        }
        presentBlocks = present
        table = FlatTable(file: file, start: h.batOffset, entries: entries, encoding: .u64LE, fileSize: fileSize,
                          regionEnd: h.batOffset + h.batLength)
        info = ImageInfo(format: "vhdx", virtualSize: m.virtualSize, clusterSize: m.blockSize, details: [
            ("block size", "\(m.blockSize)"),
            ("logical sector size", "\(m.logicalSectorSize)"),
            ("physical sector size", "\(m.physicalSectorSize)"),
            ("blocks", "\(present) of \(m.dataBlocks) present"),
            ("header sequence", "\(h.sequenceNumber) (header \(h.current + 1))"),
        ])
    }

    public var allocatedBytesHint: UInt64? { min(presentBlocks * metadata.blockSize, info.virtualSize) }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        let bs = metadata.blockSize, ratio = metadata.chunkRatio
        // One group of payload entries per call: inside it, block k's entry is k + k / ratio.
        let group = offset / bs / ratio
        let groupEnd = min(offset + maxLength, (group + 1) * ratio * bs)
        return try table.mapRun(from: offset, to: groupEnd, unit: bs, maxPieces: Self.maxBlocksPerMap, skip: group) { e, block, pos, n in
            switch State(rawValue: e & 7) {
            case .notPresent: return .unallocated(length: n)
            case .undefined, .zero, .unmapped: return .zero(length: n)
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
    }

    public func close() throws {}
}
