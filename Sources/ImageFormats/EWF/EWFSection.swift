import BlockEngine
import CDeflate

/// One section of an EWF segment file: a 76-byte descriptor (type, offset of the next
/// section from the start of the file, size, Adler-32 of the descriptor), then its data.
public struct EWFSection: Sendable {
    public var type: String
    /// Where the descriptor starts.
    public var offset: UInt64
    /// Where the next section starts (equal to `offset` for the closing done/next section).
    public var next: UInt64
    /// Where this section's data starts and ends.
    public var dataStart: UInt64 { offset + EWFSection.descriptorBytes }
    public var dataEnd: UInt64
    public var dataLength: UInt64 { dataEnd - dataStart }

    static let descriptorBytes: UInt64 = 76
    /// What the first bytes of an EWF segment file are (EWF1: EnCase 1-6, SMART, FTK).
    static let signature: [UInt8] = [0x45, 0x56, 0x46, 0x09, 0x0D, 0x0A, 0xFF, 0x00]
    /// EnCase logical evidence (L01): files, not a disk.
    static let logicalSignature: [UInt8] = [0x4C, 0x56, 0x46, 0x09, 0x0D, 0x0A, 0xFF, 0x00]
    /// EWF2 (EnCase 7 `.Ex01`, `.Lx01`).
    static let ewf2Signature: [UInt8] = [0x45, 0x56, 0x46, 0x32, 0x0D, 0x0A, 0x81, 0x00]
    static let ewf2LogicalSignature: [UInt8] = [0x4C, 0x45, 0x46, 0x32, 0x0D, 0x0A, 0x81, 0x00]
    static let fileHeaderBytes: UInt64 = 13

    /// The segment number of a segment file's header (1 for the first), checked.
    static func segmentNumber(of file: ImageFile) throws -> Int {
        let h = try file.readBytes(count: Int(fileHeaderBytes), at: 0, what: "EWF file header")
        guard Array(h[0..<8]) == signature else {
            throw BlockError.invalid(file: file.path, field: "EWF file header", detail: "not an EWF segment file (no EVF signature)")
        }
        guard h[8] == 1, h[11] == 0, h[12] == 0 else {
            throw BlockError.invalid(file: file.path, field: "EWF file header", detail: "damaged (bytes 8-12 are not 01 nn nn 00 00)")
        }
        return Int(le16(h, 9))
    }

    /// Every section of one segment file, in chain order, up to and including its done or
    /// next section. Each next offset must move forward and stay inside the file, so the walk
    /// ends after at most file-size / 76 steps; a size field that disagrees with the next
    /// offset is refused (such a file can show two different images to two readers).
    static func walk(_ file: ImageFile) throws -> [EWFSection] {
        let fileSize = try file.size()
        var sections: [EWFSection] = []
        var at = fileHeaderBytes
        while true {
            guard at <= fileSize, fileSize - at >= descriptorBytes else {
                throw BlockError.invalid(file: file.path, field: "EWF section chain",
                                         detail: "the file ends at \(fileSize) before a done or next section (a truncated segment)")
            }
            let d = try file.readBytes(count: Int(descriptorBytes), at: at, what: "EWF section descriptor")
            let stored = le32(d, 72)
            let computed = d.withUnsafeBytes { UInt32(libdeflate_adler32(1, $0.baseAddress, 72)) }
            let type = String(decoding: d[0..<16].prefix { $0 != 0 }, as: UTF8.self)
            let shown = type.escapingControls
            guard stored == computed else {
                throw BlockError.invalid(file: file.path, field: "EWF section descriptor at \(at)",
                                         detail: "checksum \(hex(stored)) where the descriptor sums to \(hex(computed)) (damaged)")
            }
            let next = le64(d, 16), size = le64(d, 24)
            if type == "done" || type == "next" {
                // The closing section points at itself (its size is 0 or 76).
                guard next == at || next == at + descriptorBytes && next == fileSize else {
                    throw BlockError.invalid(file: file.path, field: "EWF \(shown) section at \(at)", detail: "points on to \(next): it must be the last section")
                }
                sections.append(EWFSection(type: type, offset: at, next: at, dataEnd: at + descriptorBytes))
                return sections
            }
            guard next > at, next - at >= descriptorBytes, next <= fileSize else {
                throw BlockError.invalid(file: file.path, field: "EWF \(shown) section at \(at)",
                                         detail: next <= at ? "the next section offset \(next) does not move forward (a loop)"
                                                            : "the next section offset \(next) lies past the \(fileSize)-byte file (a truncated segment)")
            }
            // Expert Witness 1.35 leaves the size 0; anything else must agree with the chain.
            guard size == 0 || size == next - at else {
                throw BlockError.invalid(file: file.path, field: "EWF \(shown) section at \(at)",
                                         detail: "size \(size) disagrees with the next section at \(next)")
            }
            sections.append(EWFSection(type: type, offset: at, next: next, dataEnd: next))
            at = next
        }
    }

    /// The section's data, at most `limit` bytes of it (metadata sections are small; a
    /// hostile size must not become an allocation).
    func data(_ file: ImageFile, limit: Int) throws -> [UInt8] {
        guard dataLength <= UInt64(limit) else {
            throw BlockError.invalid(file: file.path, field: "EWF \(type.escapingControls) section at \(offset)",
                                     detail: "\(dataLength) bytes, more than such a section holds (at most \(limit))")
        }
        return try file.readBytes(count: Int(dataLength), at: dataStart, what: "EWF \(type.escapingControls) section")
    }
}

/// Adler-32 as EWF uses it (zlib's, from 1).
func ewfAdler32(_ bytes: UnsafeRawBufferPointer) -> UInt32 { UInt32(libdeflate_adler32(1, bytes.baseAddress, bytes.count)) }
func ewfAdler32(_ bytes: ArraySlice<UInt8>) -> UInt32 { bytes.withUnsafeBytes { ewfAdler32($0) } }

private func hex(_ v: UInt32) -> String { "0x" + String(v, radix: 16) }
