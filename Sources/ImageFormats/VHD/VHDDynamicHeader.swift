import BlockEngine

/// The dynamic-disk header ("cxsparse", 1024 bytes at the footer's data offset): where the
/// block allocation table is, how many entries it has and the block size.
public struct VHDDynamicHeader: Sendable {
    public var tableOffset: UInt64
    public var maxTableEntries: UInt64
    public var blockSize: UInt64
    /// A differencing disk's parent: its footer UUID, file name and locators.
    public var parentUUID: [UInt8] = []
    public var parentName: String = ""
    public var locators: [VHDParentLocator] = []
    public static let size: UInt64 = 1024
    /// Bytes of the sector bitmap before each block's data (whole sectors).
    public var bitmapBytes: UInt64 { (blockSize / (8 * 512) + 511) / 512 * 512 }
    /// The table's region: its entries padded to a whole sector, as the specification lays it out.
    public var tableRegionBytes: UInt64 { (maxTableEntries * 4).alignedUp(512) }

    public static func read(from file: ImageFile, footer: VHDFooter) throws -> VHDDynamicHeader {
        let fileSize = try file.size()
        guard footer.dataOffset <= fileSize, fileSize - footer.dataOffset >= 1024 else {
            throw BlockError.invalid(file: file.path, field: "VHD data offset", detail: "\(footer.dataOffset) does not leave a dynamic header inside the \(fileSize)-byte file")
        }
        let b = try file.readBytes(count: 1024, at: footer.dataOffset, what: "VHD dynamic header")
        guard Array(b[0..<8]) == Array("cxsparse".utf8) else {
            throw BlockError.invalid(file: file.path, field: "VHD dynamic header", detail: "no 'cxsparse' cookie at offset \(footer.dataOffset)")
        }
        var h = VHDDynamicHeader(tableOffset: be64(b, 16), maxTableEntries: UInt64(be32(b, 28)), blockSize: UInt64(be32(b, 32)))
        if footer.diskType == VHDFooter.differencing {
            h.parentUUID = Array(b[40..<56])
            h.parentName = VHDParentLocator.utf16(Array(b[64..<576]), bigEndian: true)
            h.locators = try (0..<8).compactMap { try VHDParentLocator.read(Array(b[576 + $0 * 24 ..< 600 + $0 * 24]), file: file, fileSize: fileSize) }
        }
        guard h.blockSize >= 512, h.blockSize.isPowerOfTwo, h.blockSize <= 1 << 28 else {
            throw BlockError.invalid(file: file.path, field: "VHD block size", detail: "\(h.blockSize) (a power of two of at least 512 bytes)")
        }
        // Enough entries for the disk, and no more than the largest disk has (QEMU's checks).
        guard h.maxTableEntries <= VHDFooter.maxSectors * 512 / h.blockSize,
              h.maxTableEntries * h.blockSize >= footer.virtualSize else {
            throw BlockError.invalid(file: file.path, field: "VHD max table entries",
                                     detail: "\(h.maxTableEntries) entries of \(h.blockSize) bytes do not fit a \(footer.virtualSize)-byte disk")
        }
        let tableBytes = h.maxTableEntries * 4
        guard h.tableOffset <= fileSize, fileSize - h.tableOffset >= tableBytes else {
            throw BlockError.invalid(file: file.path, field: "VHD table offset", detail: "a \(tableBytes)-byte table at \(h.tableOffset) does not fit the \(fileSize)-byte file")
        }
        return h
    }
}
