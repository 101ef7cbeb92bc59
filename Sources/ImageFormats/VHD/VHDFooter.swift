import BlockEngine

/// The VHD footer (512 bytes, big-endian): at the end of a fixed image, and copied at the
/// start of a dynamic one. QEMU (`vpc`) finds it at offset 0 first (a dynamic image) and
/// only then at the end (a fixed one), and refuses a footer whose checksum is wrong.
public struct VHDFooter: Sendable {
    public static let size = 512
    static let cookie = Array("conectix".utf8)
    public enum Kind: Sendable { case fixed, dynamic }

    public var kind: Kind
    public var dataOffset: UInt64
    public var creatorApp: String
    public var currentSize: UInt64
    public var cylinders: UInt64, heads: UInt64, sectorsPerTrack: UInt64
    public var diskType: UInt32
    /// The guest disk's size as QEMU 7.2 computes it (see `virtualSize(of:)`).
    public var virtualSize: UInt64

    /// CHS of 65535 x 16 x 255 sectors: the geometry's maximum, whose product is not the size.
    static let maxGeometrySectors: UInt64 = 65535 * 16 * 255
    /// QEMU's limit, 2040 GiB.
    static let maxSectors: UInt64 = 0xFF00_0000

    /// Whether `head` (the first sector of a file) is a dynamic VHD, as QEMU probes `vpc`
    /// (a fixed VHD probes as raw: its footer is at the end; `--format vpc` opens it).
    public static func probe(_ head: [UInt8]) -> Bool { head.count >= 8 && Array(head[0..<8]) == cookie }

    public static func read(from file: ImageFile) throws -> VHDFooter {
        var bytes = try file.readBytes(count: size, at: 0, what: "VHD footer")
        var kind = Kind.dynamic
        if Array(bytes[0..<8]) != cookie {
            let fileSize = try file.size()
            guard fileSize >= UInt64(size) else {
                throw BlockError.invalid(file: file.path, field: "VHD footer", detail: "the file is shorter than a footer")
            }
            bytes = try file.readBytes(count: size, at: fileSize - UInt64(size), what: "VHD footer")
            guard Array(bytes[0..<8]) == cookie else {
                throw BlockError.invalid(file: file.path, field: "VHD footer", detail: "no 'conectix' footer at the start or the end of the file")
            }
            kind = .fixed
        }
        let stored = be32(bytes, 64)
        guard checksum(bytes, skipping: 64) == stored else {
            throw BlockError.invalid(file: file.path, field: "VHD footer checksum", detail: "0x\(String(stored, radix: 16)) does not match the footer (QEMU refuses it too)")
        }
        let app = String(decoding: bytes[28..<32].map { $0 == 0 ? UInt8(ascii: " ") : $0 }, as: UTF8.self)
        var f = VHDFooter(kind: kind, dataOffset: be64(bytes, 16), creatorApp: app, currentSize: be64(bytes, 48),
                          cylinders: UInt64(bytes[56]) << 8 | UInt64(bytes[57]), heads: UInt64(bytes[58]), sectorsPerTrack: UInt64(bytes[59]),
                          diskType: be32(bytes, 60), virtualSize: 0)
        f.virtualSize = try f.computedSize(file: file.path, rawApp: Array(bytes[28..<32]))
        return f
    }

    /// Virtual PC and old QEMU size a disk by its CHS geometry; other creators (Hyper-V 'win ',
    /// 'qem2', Disk2vhd 'd2v ', XenConverter 'CTXS', XenServer 'tap\0') by the current size,
    /// and so does any image whose geometry is the maximum (QEMU 7.2's rule, which
    /// `qemu-img info` shows).
    private func computedSize(file: String, rawApp: [UInt8]) throws -> UInt64 {
        let bySize: [[UInt8]] = ["win ", "qem2", "d2v ", "CTXS"].map { Array($0.utf8) } + [Array("tap".utf8) + [0]]
        let chs = cylinders * heads * sectorsPerTrack
        let sectors = bySize.contains(rawApp) || chs == Self.maxGeometrySectors ? currentSize / 512 : chs
        guard sectors <= Self.maxSectors else {
            throw BlockError.invalid(file: file, field: "VHD size", detail: "\(sectors) sectors (QEMU allows at most \(Self.maxSectors), 2040 GiB)")
        }
        return sectors * 512
    }

    /// One's complement of the byte sum, the checksum field (4 bytes at `skipping`) left out.
    static func checksum(_ b: [UInt8], skipping at: Int) -> UInt32 {
        var sum: UInt32 = 0
        for (i, x) in b.enumerated() where i < at || i >= at + 4 { sum &+= UInt32(x) }
        return ~sum
    }
}

/// The dynamic-disk header ("cxsparse", 1024 bytes at the footer's data offset): where the
/// block allocation table is, how many entries it has and the block size.
public struct VHDDynamicHeader: Sendable {
    public var tableOffset: UInt64
    public var maxTableEntries: UInt64
    public var blockSize: UInt64
    /// Bytes of the sector bitmap before each block's data (whole sectors).
    public var bitmapBytes: UInt64 { (blockSize / (8 * 512) + 511) / 512 * 512 }

    public static func read(from file: ImageFile, footer: VHDFooter) throws -> VHDDynamicHeader {
        let fileSize = try file.size()
        guard footer.dataOffset <= fileSize, fileSize - footer.dataOffset >= 1024 else {
            throw BlockError.invalid(file: file.path, field: "VHD data offset", detail: "\(footer.dataOffset) does not leave a dynamic header inside the \(fileSize)-byte file")
        }
        let b = try file.readBytes(count: 1024, at: footer.dataOffset, what: "VHD dynamic header")
        guard Array(b[0..<8]) == Array("cxsparse".utf8) else {
            throw BlockError.invalid(file: file.path, field: "VHD dynamic header", detail: "no 'cxsparse' cookie at offset \(footer.dataOffset)")
        }
        let h = VHDDynamicHeader(tableOffset: be64(b, 16), maxTableEntries: UInt64(be32(b, 28)), blockSize: UInt64(be32(b, 32)))
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
