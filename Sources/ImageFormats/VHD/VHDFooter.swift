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
    static let differencing: UInt32 = 4
    public var isDifferencing: Bool { diskType == Self.differencing }
    /// The disk's UUID (a differencing child names its parent by it).
    public var uuid: [UInt8] { Array(raw[68..<84]) }
    /// The footer as read (checksum valid): a dynamic image's footer is written again at the
    /// new end of the file as it grows, byte for byte, as QEMU does.
    public var raw: [UInt8]
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
                          diskType: be32(bytes, 60), raw: bytes, virtualSize: 0)
        f.virtualSize = try f.computedSize(file: file.path, rawApp: Array(bytes[28..<32]))
        switch (f.diskType, kind) {
        case (2, .fixed), (3, .dynamic): return f
        case (differencing, .dynamic): return f
        default:
            throw BlockError.invalid(file: file.path, field: "VHD disk type",
                                     detail: "\(f.diskType) with the footer \(kind == .fixed ? "at the end (a fixed disk is type 2)" : "copied at the start (a dynamic disk is type 3)")")
        }
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
