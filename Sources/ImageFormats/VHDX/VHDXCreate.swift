import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// Creates a VHDX as qemu-img 7.2 does (`-f vhdx`): the file identifier with the creator,
/// two headers (a random sequence number, the second one higher), the log right after the
/// header section, the table and the metadata region (1 MiB) each on a whole MiB, data
/// from 5 MiB after the table. Block size by disk size unless given (8 MiB up to 1 GiB,
/// 16 MiB up to 100 GiB, 32 MiB up to 32 TiB, then 64 MiB); 512-byte sectors. With
/// `blockStateZero` (qemu-img's default) every block starts in the zero state, also for a
/// fixed image; without it, a dynamic image's blocks are not present and a fixed image's
/// are laid out one after another.
public enum VHDXCreate {
    public enum Subformat: String, CaseIterable, Sendable { case dynamic, fixed }

    public struct Options: Sendable {
        public var subformat: Subformat = .dynamic
        /// 0: chosen by the size, as qemu-img chooses it.
        public var blockSize: UInt64 = 0
        public var logSize: UInt64 = 1 << 20
        public var blockStateZero = true
        public init() {}
    }

    static let mib: UInt64 = 1 << 20
    static let sectorSize: UInt64 = 512

    /// The block size qemu-img picks for a disk of `size` bytes.
    static func defaultBlockSize(_ size: UInt64) -> UInt64 {
        size > 32 << 40 ? 64 * mib : size > 100 << 30 ? 32 * mib : size > 1 << 30 ? 16 * mib : 8 * mib
    }

    /// Refuses what qemu-img refuses: more than 64 TiB, a block size that is not a power of
    /// two from 1 to 256 MiB, a log smaller than 1 MiB or not a multiple of it.
    public static func validate(size: UInt64, options o: Options) throws -> (blockSize: UInt64, logSize: UInt64) {
        guard size <= VHDXMetadata.maxVirtualSize else { throw BlockError.usage("\(size) bytes is too large for VHDX (at most 64 TiB)") }
        let bs = o.blockSize == 0 ? defaultBlockSize(size) : o.blockSize
        guard bs >= mib, bs <= 256 * mib, bs.isPowerOfTwo else {
            throw BlockError.usage("-o block_size=\(bs): a power of two from 1 MiB to 256 MiB")
        }
        guard o.logSize >= mib, o.logSize <= UInt64(UInt32.max) else { throw BlockError.usage("-o log_size=\(o.logSize): at least 1 MiB") }
        return (bs, o.logSize.alignedUp(mib))
    }

    public static func create(path: String, size: UInt64, options o: Options) throws {
        let (blockSize, logSize) = try validate(size: size, options: o)
        let dataBlocks = (size + blockSize - 1) / blockSize
        let chunkRatio = (1 << 23) * sectorSize / blockSize
        let tableEntries = dataBlocks == 0 ? 0 : dataBlocks + (dataBlocks - 1) / chunkRatio
        let logOffset = mib
        let batOffset = (logOffset + logSize).alignedUp(mib)
        let batLength = max(mib, (tableEntries * 8).alignedUp(mib))
        let metadataOffset = (batOffset + batLength).alignedUp(mib)
        let dataOffset = batOffset + batLength + 5 * mib

        var identifier = [UInt8](repeating: 0, count: 64 << 10)
        identifier.replaceSubrange(0..<8, with: VHDXHeader.identifier)
        let creator = Array("rawmount".utf16).flatMap { [UInt8(truncatingIfNeeded: $0), UInt8($0 >> 8)] }
        identifier.replaceSubrange(8 ..< 8 + creator.count, with: creator)

        var header = [UInt8](repeating: 0, count: VHDXHeader.headerBytes)
        header.replaceSubrange(0..<4, with: Array("head".utf8))
        put64le(&header, 8, UInt64(UInt32.random(in: 0...UInt32.max)))
        header.replaceSubrange(16..<32, with: randomGUID())   // file write GUID
        header.replaceSubrange(32..<48, with: randomGUID())   // data write GUID
        header[66] = 1                                         // version 1 (log version 0)
        put32(&header, 68, UInt32(logSize))
        put64le(&header, 72, logOffset)

        var regions = [UInt8](repeating: 0, count: VHDXHeader.regionTableBytes)
        regions.replaceSubrange(0..<4, with: Array("regi".utf8))
        put32(&regions, 8, 2)
        for (i, (guid, offset, length)) in [(VHDXHeader.batGUID, batOffset, batLength), (VHDXHeader.metadataGUID, metadataOffset, mib)].enumerated() {
            let e = 16 + i * 32
            regions.replaceSubrange(e ..< e + 16, with: guid.bytes)
            put64le(&regions, e + 16, offset)
            put32(&regions, e + 24, UInt32(length))
        }
        putCRC(&regions)

        var table = [UInt8](repeating: 0, count: Int(tableEntries * 8))
        let state: UInt64 = o.blockStateZero ? 2 : o.subformat == .fixed ? 6 : 0
        if state != 0 {
            for k in 0 ..< dataBlocks {
                let entry = state == 6 ? (dataOffset + k * blockSize) | 6 : state
                put64le(&table, Int(k + k / chunkRatio) * 8, entry)
            }
        }

        var meta = [UInt8](repeating: 0, count: 64 << 10)
        meta.replaceSubrange(0..<8, with: Array("metadata".utf8))
        meta[10] = 5
        let items: [(VHDXGUID, [UInt8], UInt32)] = [
            (VHDXMetadata.fileParameters, le32bytes(UInt32(blockSize)) + le32bytes(o.subformat == .fixed ? 1 : 0), 4),
            (VHDXMetadata.virtualDiskSize, le64bytes(size), 6),
            (VHDXMetadata.virtualDiskID, randomGUID(), 6),
            (VHDXMetadata.logicalSectorSize, le32bytes(UInt32(sectorSize)), 6),
            (VHDXMetadata.physicalSectorSize, le32bytes(UInt32(sectorSize)), 6),
        ]
        var itemBytes: [UInt8] = []
        for (i, (guid, bytes, flags)) in items.enumerated() {
            let e = 32 + i * 32
            meta.replaceSubrange(e ..< e + 16, with: guid.bytes)
            put32(&meta, e + 16, UInt32(64 << 10) + UInt32(itemBytes.count))
            put32(&meta, e + 20, UInt32(bytes.count))
            put32(&meta, e + 24, flags)  // required (4), virtual-disk item (2)
            itemBytes += bytes
        }

        try ImageFile.createComplete(path: path) { file in
            try file.write(identifier, at: 0)
            for (i, at) in VHDXHeader.headerOffsets.enumerated() {
                var h = header
                put64le(&h, 8, le64(header, 8) + UInt64(i))
                putCRC(&h)
                try file.write(h, at: at)
            }
            try file.truncate(to: o.subformat == .fixed ? dataOffset + size : dataOffset)
            if !table.isEmpty { try file.write(table, at: batOffset) }
            for at in VHDXHeader.regionTableOffsets { try file.write(regions, at: at) }
            try file.write(meta, at: metadataOffset)
            try file.write(itemBytes, at: metadataOffset + (64 << 10))
        }
    }

    private static func putCRC(_ b: inout [UInt8]) { put32(&b, 4, crc32c(b, zeroing: 4)) }
    private static func put64le(_ b: inout [UInt8], _ o: Int, _ v: UInt64) { put64(&b, o, v) }
    private static func le32bytes(_ v: UInt32) -> [UInt8] { var b = [UInt8](repeating: 0, count: 4); put32(&b, 0, v); return b }
    private static func le64bytes(_ v: UInt64) -> [UInt8] { var b = [UInt8](repeating: 0, count: 8); put64(&b, 0, v); return b }
}
