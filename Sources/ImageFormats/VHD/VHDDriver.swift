import BlockEngine

/// VHD (QEMU's `vpc`), read-only for now. Fixed: the guest disk is the file's bytes before
/// its footer. Dynamic: the block allocation table (big-endian sector numbers, 0xFFFFFFFF
/// for a block not here) names, per block, a sector bitmap followed by the block's data;
/// as QEMU does, a block present is read whole (its bitmap is not consulted) and a block
/// not here reads as zeros. The table goes through the shared table cache.
public final class VHDDriver: ImageDriver {
    public let file: ImageFile
    public let info: ImageInfo
    public var readOnlyReason: String? { "writing VHD images is not supported yet" }
    public let footer: VHDFooter
    public let dynamic: VHDDynamicHeader?

    let table: FlatTable?
    let fileSize: UInt64
    /// Blocks the table names, counted at open (QEMU reads the whole table then too).
    let presentBlocks: UInt64
    static let notPresent: UInt64 = 0xFFFF_FFFF
    /// Longest run one `map` call assembles.
    static let maxBlocksPerMap = 256

    public init(file: ImageFile) throws {
        let f = try VHDFooter.read(from: file)
        self.file = file
        footer = f
        fileSize = try file.size()
        var details: [(String, String)] = [("subformat", f.kind == .fixed ? "fixed" : "dynamic"), ("creator", f.creatorApp.escapingControls)]
        guard f.kind == .dynamic else {
            dynamic = nil; table = nil; presentBlocks = 0
            info = ImageInfo(format: "vpc", virtualSize: f.virtualSize, clusterSize: 512, details: details, hasClusters: false)
            return
        }
        let h = try VHDDynamicHeader.read(from: file, footer: f)
        dynamic = h
        // Every block the table names must lie inside the file, or QEMU calls the image
        // truncated and refuses it; one pass over the table (its size is bounded by the file).
        var present: UInt64 = 0, end: UInt64 = 0
        try FlatTable.forEachEntry(file, start: h.tableOffset, count: h.maxTableEntries, encoding: .u32BE, what: "VHD block allocation table") { _, e in
            guard e != Self.notPresent else { return }
            present += 1
            end = max(end, e * 512 + h.bitmapBytes + h.blockSize)
        }
        guard end <= fileSize else {
            throw BlockError.invalid(file: file.path, field: "VHD block allocation table",
                                     detail: "a block ends at \(end), past the end of the \(fileSize)-byte file (the image was truncated)")
        }
        presentBlocks = present
        table = FlatTable(file: file, start: h.tableOffset, entries: h.maxTableEntries, encoding: .u32BE, fileSize: fileSize)
        details += [("block size", "\(h.blockSize)"), ("blocks", "\(present) of \(h.maxTableEntries) present")]
        info = ImageInfo(format: "vpc", virtualSize: f.virtualSize, clusterSize: h.blockSize, details: details)
    }

    public var allocatedBytesHint: UInt64? {
        guard let dynamic else { return info.virtualSize }
        return min(presentBlocks * dynamic.blockSize, info.virtualSize)
    }

    public func map(_ offset: UInt64, maxLength: UInt64) throws -> Mapping {
        guard let table, let h = dynamic else {
            // Fixed: the file's bytes; past the file (a size larger than its data), zeros.
            guard offset < fileSize else { return .zero(length: maxLength) }
            return .data(host: offset, length: min(maxLength, fileSize - offset))
        }
        return try table.mapRun(from: offset, to: offset + maxLength, unit: h.blockSize, maxPieces: Self.maxBlocksPerMap) { e, block, pos, n in
            guard e != Self.notPresent else { return .unallocated(length: n) }
            return .data(host: e * 512 + h.bitmapBytes + pos - block * h.blockSize, length: n)
        }
    }

    public func close() throws {}
}
