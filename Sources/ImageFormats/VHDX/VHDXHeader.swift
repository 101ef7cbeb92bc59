import BlockEngine

/// A GUID as VHDX stores it: the first three fields little-endian, the rest as written.
struct VHDXGUID: Hashable, Sendable, CustomStringConvertible {
    let bytes: [UInt8]
    init(bytes: [UInt8]) { self.bytes = bytes }
    /// From its text form, "2DC27766-F623-4200-9D64-115E9BFD4A08".
    init(_ text: StaticString) {
        let hex = "\(text)".filter { $0 != "-" }
        var b: [UInt8] = stride(from: 0, to: 32, by: 2).map { i in
            UInt8(hex[hex.index(hex.startIndex, offsetBy: i) ..< hex.index(hex.startIndex, offsetBy: i + 2)], radix: 16)!
        }
        b[0..<4].reverse(); b[4..<6].reverse(); b[6..<8].reverse()
        bytes = b
    }
    var isZero: Bool { bytes.allSatisfy { $0 == 0 } }
    var description: String {
        var b = bytes
        b[0..<4].reverse(); b[4..<6].reverse(); b[6..<8].reverse()
        let h = b.map { String($0, radix: 16, uppercase: true).leftPadded(2) }.joined()
        return [0..<8, 8..<12, 12..<16, 16..<20, 20..<32].map { r in
            String(h[h.index(h.startIndex, offsetBy: r.lowerBound) ..< h.index(h.startIndex, offsetBy: r.upperBound)])
        }.joined(separator: "-")
    }
}

private extension String {
    func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

/// The VHDX header section (first 1 MiB): the file identifier, two headers (the one with
/// the higher sequence number among those whose CRC-32C holds is current, as the
/// specification and QEMU pick it), and two copies of the region table, which say where
/// the block allocation table and the metadata region are.
public struct VHDXHeader: Sendable {
    static let identifier = Array("vhdxfile".utf8)
    static let headerOffsets: [UInt64] = [64 << 10, 128 << 10]
    static let headerBytes = 4096
    static let regionTableOffsets: [UInt64] = [192 << 10, 256 << 10]
    static let regionTableBytes = 64 << 10
    static let maxRegionEntries = 2047
    static let batGUID = VHDXGUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
    static let metadataGUID = VHDXGUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
    static let mib: UInt64 = 1 << 20

    public var sequenceNumber: UInt64
    var logGUID: VHDXGUID
    /// Changes with every change a reader of the disk could see; a differencing child names
    /// its parent by it.
    var dataWriteGUID: VHDXGUID { VHDXGUID(bytes: Array(raw[32..<48])) }
    /// The current header's 4 KiB as read (its checksum holds): updates start from it.
    var raw: [UInt8]
    public var logOffset: UInt64
    public var logLength: UInt64
    /// Which header (0 or 1) is current.
    public var current: Int
    public var batOffset: UInt64
    public var batLength: UInt64
    public var metadataOffset: UInt64
    public var metadataLength: UInt64

    public static func probe(_ head: [UInt8]) -> Bool { head.count >= 8 && Array(head[0..<8]) == identifier }

    public static func read(from file: ImageFile) throws -> VHDXHeader {
        let size = try file.size()
        guard size >= 1 << 20 else {
            throw BlockError.invalid(file: file.path, field: "VHDX header section", detail: "the file (\(size) bytes) is shorter than the 1 MiB header section")
        }
        guard probe(try file.readBytes(count: 8, at: 0, what: "VHDX file identifier")) else {
            throw BlockError.invalid(file: file.path, field: "VHDX file identifier", detail: "no 'vhdxfile' signature at offset 0")
        }
        // The current header: valid signature and checksum, highest sequence number.
        var best: (index: Int, seq: UInt64, bytes: [UInt8])?
        for (i, at) in headerOffsets.enumerated() {
            let b = try file.readBytes(count: headerBytes, at: at, what: "VHDX header \(i + 1)")
            guard Array(b[0..<4]) == Array("head".utf8), le32(b, 4) == crc32c(b, zeroing: 4) else { continue }
            let seq = le64(b, 8)
            if best == nil || seq > best!.seq { best = (i, seq, b) }
        }
        guard let (index, seq, h) = best else {
            throw BlockError.invalid(file: file.path, field: "VHDX headers", detail: "neither header has a valid signature and CRC-32C")
        }
        guard le16(h, 66) == 1 else {
            throw BlockError.unsupported(file: file.path, feature: "VHDX version \(le16(h, 66)) (version 1 is read)")
        }
        guard le16(h, 64) == 0 else {
            throw BlockError.unsupported(file: file.path, feature: "VHDX log version \(le16(h, 64)) (version 0 is read)")
        }
        var header = VHDXHeader(sequenceNumber: seq, logGUID: VHDXGUID(bytes: Array(h[48..<64])), raw: h, logOffset: le64(h, 72),
                                logLength: UInt64(le32(h, 68)), current: index,
                                batOffset: 0, batLength: 0, metadataOffset: 0, metadataLength: 0)
        try header.readRegions(file, fileSize: size)
        return header
    }

    /// The first region table whose checksum holds (QEMU reads the first; the second is its copy).
    private mutating func readRegions(_ file: ImageFile, fileSize: UInt64) throws {
        var table: [UInt8]?
        for (i, at) in Self.regionTableOffsets.enumerated() {
            let b = try file.readBytes(count: Self.regionTableBytes, at: at, what: "VHDX region table \(i + 1)")
            if Array(b[0..<4]) == Array("regi".utf8), le32(b, 4) == crc32c(b, zeroing: 4) { table = b; break }
        }
        guard let t = table else {
            throw BlockError.invalid(file: file.path, field: "VHDX region table", detail: "neither copy has a valid signature and CRC-32C")
        }
        let count = Int(le32(t, 8))
        guard count <= Self.maxRegionEntries else {
            throw BlockError.invalid(file: file.path, field: "VHDX region table", detail: "\(count) entries (at most \(Self.maxRegionEntries))")
        }
        var seen = Set<VHDXGUID>()
        for i in 0..<count {
            let e = 16 + i * 32
            let guid = VHDXGUID(bytes: Array(t[e ..< e + 16]))
            let offset = le64(t, e + 16), length = UInt64(le32(t, e + 24)), required = le32(t, e + 28) & 1 != 0
            guard seen.insert(guid).inserted else {
                throw BlockError.invalid(file: file.path, field: "VHDX region table", detail: "region \(guid) is listed twice")
            }
            // Regions are whole MiBs after the header section, inside the file.
            guard offset % Self.mib == 0, length % Self.mib == 0, offset >= Self.mib, length > 0,
                  offset <= fileSize, length <= fileSize - offset else {
                throw BlockError.invalid(file: file.path, field: "VHDX region \(guid)",
                                         detail: "\(length) bytes at \(offset) are not whole MiBs inside the \(fileSize)-byte file")
            }
            switch guid {
            case Self.batGUID: batOffset = offset; batLength = length
            case Self.metadataGUID: metadataOffset = offset; metadataLength = length
            default:
                if required { throw BlockError.unsupported(file: file.path, feature: "VHDX required region \(guid)") }
            }
        }
        guard batLength > 0, metadataLength > 0 else {
            throw BlockError.invalid(file: file.path, field: "VHDX region table", detail: "no \(batLength == 0 ? "block allocation table" : "metadata") region")
        }
        let ranges = [(batOffset, batLength), (metadataOffset, metadataLength)] + (logLength > 0 ? [(logOffset, logLength)] : [])
        for (a, b) in [(0, 1), (0, 2), (1, 2)] where b < ranges.count {
            let x = ranges[a], y = ranges[b]
            guard x.0 + x.1 <= y.0 || y.0 + y.1 <= x.0 else {
                throw BlockError.invalid(file: file.path, field: "VHDX regions", detail: "the block table, metadata and log regions overlap")
            }
        }
        if logLength > 0 {
            guard logOffset % Self.mib == 0, logLength % Self.mib == 0, logOffset >= Self.mib, logOffset <= fileSize, logLength <= fileSize - logOffset else {
                throw BlockError.invalid(file: file.path, field: "VHDX log", detail: "\(logLength) bytes at \(logOffset) are not whole MiBs inside the file")
            }
        }
    }
}
