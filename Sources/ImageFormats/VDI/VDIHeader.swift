import BlockEngine

/// VDI (VirtualBox) header version 1.1, validated as QEMU does plus the checks it misses
/// (map inside the file ahead of the data, blocks_allocated in range, image type).
public struct VDIHeader: Sendable {
    public static let signature: UInt32 = 0xBEDA_107F
    public static let version11: UInt32 = 0x0001_0001
    public static let blockSizeRequired: UInt32 = 1 << 20
    /// QEMU's bound on blocks_in_image ((INT_MAX + 1 - 512) / 4).
    static let maxBlocks: UInt32 = 0x1FFF_FF80
    public static let blockFree: UInt32 = 0xFFFF_FFFF
    public static let blockDiscarded: UInt32 = 0xFFFF_FFFE
    static let headerBytes = 512

    /// The 512 header bytes as read, so rewrites keep fields we do not interpret.
    public var raw: [UInt8]
    public var text: String { String(decoding: raw[0..<64].prefix { $0 != 0 }, as: UTF8.self) }
    public var headerSize: UInt32 { le32(raw, 0x48) }
    public var imageType: UInt32 { le32(raw, 0x4C) }
    public var offsetBmap: UInt32 { le32(raw, 0x154) }
    public var offsetData: UInt32 { le32(raw, 0x158) }
    public var sectorSize: UInt32 { le32(raw, 0x168) }
    public var diskSize: UInt64 { le64(raw, 0x170) }
    public var blockSize: UInt32 { le32(raw, 0x178) }
    public var blockExtra: UInt32 { le32(raw, 0x17C) }
    public var blocksInImage: UInt32 { le32(raw, 0x180) }
    public var blocksAllocated: UInt32 {
        get { le32(raw, 0x184) }
        set { put32(&raw, 0x184, newValue) }
    }
    public var uuidImage: [UInt8] { Array(raw[0x188..<0x198]) }
    /// A differencing image's parent: the parent's uuidImage (VirtualBox's uuidLinkage).
    public var uuidLink: [UInt8] { Array(raw[0x1A8..<0x1B8]) }
    var uuidParent: [UInt8] { Array(raw[0x1B8..<0x1C8]) }
    /// VirtualBox snapshot images: blocks not here (0xFFFFFFFF) come from the parent.
    public var isDifferencing: Bool { imageType == 4 }

    /// A UUID as VirtualBox prints it (the first three fields are stored little-endian).
    public static func uuidText(_ u: [UInt8]) -> String {
        func hex(_ bytes: [UInt8]) -> String { bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }
        return "{" + [hex(u[0..<4].reversed()), hex(u[4..<6].reversed()), hex(u[6..<8].reversed()), hex(Array(u[8..<10])), hex(Array(u[10..<16]))]
            .joined(separator: "-") + "}"
    }

    /// Virtual size: disk_size rounded up to a sector, as QEMU does.
    public var virtualSize: UInt64 { diskSize.alignedUp(512) }
    /// Bytes each allocated block occupies in the file (VirtualBox prepends block_extra).
    public var blockStride: UInt64 { UInt64(blockSize) + UInt64(blockExtra) }
    /// Bytes of the block map region, padded to whole sectors.
    public var mapBytes: UInt64 { (UInt64(blocksInImage) * 4).alignedUp(512) }

    public static func probe(_ b: [UInt8]) -> Bool { b.count >= 0x48 && le32(b, 0x40) == signature }

    public static func read(from file: ImageFile) throws -> VDIHeader {
        let size = try file.size()
        guard size >= UInt64(headerBytes) else {
            throw BlockError.truncated(file: file.path, what: "VDI header", offset: 0, needed: UInt64(headerBytes), fileSize: size)
        }
        let h = VDIHeader(raw: try file.readBytes(count: headerBytes, at: 0, what: "VDI header"))
        try h.validate(path: file.path, fileSize: size)
        return h
    }

    func validate(path: String, fileSize: UInt64) throws {
        func bad(_ field: String, _ detail: String) -> BlockError { .invalid(file: path, field: field, detail: detail) }
        guard le32(raw, 0x40) == Self.signature else { throw bad("VDI signature", "not a VDI image") }
        guard le32(raw, 0x44) == Self.version11 else {
            throw BlockError.unsupported(file: path, feature: "VDI version 0x\(String(le32(raw, 0x44), radix: 16)) (only 1.1 is supported)")
        }
        guard headerSize >= 0x180, headerSize <= 0x1B8 else { throw bad("header_size", "\(headerSize) is not a VDI 1.1 header size") }
        guard imageType == 1 || imageType == 2 || imageType == 4 else {
            throw BlockError.unsupported(file: path, feature: "VDI image type \(imageType) (only dynamic, static and differencing images)")
        }
        if isDifferencing && !uuidLink.contains(where: { $0 != 0 }) {
            throw bad("parent UUID", "a differencing image must name its parent")
        }
        guard sectorSize == 512 else { throw bad("sector_size", "\(sectorSize) (must be 512)") }
        guard blockSize == Self.blockSizeRequired else { throw bad("block_size", "\(blockSize) (must be 1 MiB)") }
        guard blockExtra % 512 == 0, blockExtra <= 1 << 20 else { throw bad("block_extra", "\(blockExtra) is not a sector multiple up to 1 MiB") }
        guard blocksInImage <= Self.maxBlocks else { throw bad("blocks_in_image", "\(blocksInImage) exceeds \(Self.maxBlocks)") }
        guard offsetBmap % 512 == 0, offsetBmap >= UInt32(Self.headerBytes) else {
            throw bad("offset_bmap", "\(offsetBmap) is not sector aligned after the header")
        }
        guard offsetData % 512 == 0 else { throw bad("offset_data", "\(offsetData) is not sector aligned") }
        guard UInt64(offsetBmap) + mapBytes <= UInt64(offsetData) else {
            throw bad("offset_data", "\(offsetData) overlaps the \(mapBytes)-byte block map at \(offsetBmap)")
        }
        guard UInt64(offsetBmap) + mapBytes <= fileSize else {
            throw BlockError.truncated(file: path, what: "VDI block map", offset: UInt64(offsetBmap), needed: mapBytes, fileSize: fileSize)
        }
        guard diskSize <= UInt64(blocksInImage) * UInt64(blockSize) else {
            throw bad("disk_size", "\(diskSize) is larger than \(blocksInImage) blocks of \(blockSize)")
        }
        guard blocksAllocated <= blocksInImage else { throw bad("blocks_allocated", "\(blocksAllocated) > blocks_in_image \(blocksInImage)") }
    }
}
