import BlockEngine

/// A VMDK text descriptor (embedded in a sparse file or standalone), parsed line by line.
public struct VMDKDescriptor: Sendable {
    /// Bound on sector counts and offsets, so byte arithmetic on them cannot overflow.
    static let maxSectors: UInt64 = 1 << 44

    public enum Access: String, Sendable { case rw = "RW", rdonly = "RDONLY", noaccess = "NOACCESS" }
    public enum ExtentType: String, Sendable {
        case sparse = "SPARSE", flat = "FLAT", zero = "ZERO", vmfs = "VMFS", vmfsSparse = "VMFSSPARSE"
        case vmfsRDM = "VMFSRDM", vmfsRaw = "VMFSRAW", seSparse = "SESPARSE"
    }
    public struct Extent: Sendable {
        public var access: Access
        public var sectors: UInt64
        public var type: ExtentType
        public var fileName: String?
        public var offset: UInt64
    }

    public static let maxBytes = 1 << 20

    public var fields: [String: String] = [:]
    public var extents: [Extent] = []
    public var createType: String? { fields["createType"] }
    public var cid: UInt32? { fields["CID"].flatMap { UInt32($0, radix: 16) } }
    public var parentCID: UInt32? { fields["parentCID"].flatMap { UInt32($0, radix: 16) } }
    public var parentFileNameHint: String? { fields["parentFileNameHint"] }

    /// Text that looks like a descriptor (for probing standalone descriptor files).
    public static func probe(_ bytes: [UInt8]) -> Bool {
        let text = String(decoding: bytes.prefix(512), as: UTF8.self)
        return text.contains("# Disk DescriptorFile") || (text.contains("createType") && text.contains("version"))
    }

    /// Parsed on the UTF-8 bytes, not on Characters: a split VMDK's descriptor has thousands
    /// of lines, and grapheme-by-grapheme splitting cost more than opening the extents.
    public static func parse(_ bytes: [UInt8], file: String) throws -> VMDKDescriptor {
        guard bytes.count <= maxBytes else {
            throw BlockError.invalid(file: file, field: "VMDK descriptor", detail: "larger than 1 MiB")
        }
        var d = VMDKDescriptor()
        let text = bytes.prefix { $0 != 0 }
        for (n, rawLine) in lines(text).enumerated() {
            let line = trim(rawLine)
            if line.isEmpty || line.first == UInt8(ascii: "#") { continue }
            // Fields may be parted by tabs too (QEMU's sscanf takes any blank).
            let first = line.prefix { $0 != 0x20 && $0 != 0x09 }
            if Access(rawValue: String(decoding: first, as: UTF8.self)) != nil {
                d.extents.append(try parseExtent(line, lineNumber: n + 1, file: file))
                continue
            }
            guard let eq = line.firstIndex(of: UInt8(ascii: "=")) else {
                throw BlockError.invalid(file: file, field: "VMDK descriptor line \(n + 1)",
                                         detail: "'\(String(decoding: line, as: UTF8.self).prefix(80))' is neither key=value nor an extent")
            }
            let key = trim(line[..<eq])
            var value = trim(line[(eq + 1)...])
            if value.count >= 2, value.first == UInt8(ascii: "\""), value.last == UInt8(ascii: "\"") { value = value.dropFirst().dropLast() }
            d.fields[String(decoding: key, as: UTF8.self)] = String(decoding: value, as: UTF8.self)
        }
        return d
    }

    /// The non-empty lines, split where Swift's `Character.isNewline` would split: LF, VT,
    /// FF, CR, NEL (C2 85), LINE and PARAGRAPH SEPARATOR (E2 80 A8/A9).
    static func lines(_ text: ArraySlice<UInt8>) -> [ArraySlice<UInt8>] {
        var out: [ArraySlice<UInt8>] = []
        var start = text.startIndex, i = text.startIndex
        while i < text.endIndex {
            let b = text[i]
            var width = 0
            if b >= 0x0A && b <= 0x0D { width = 1 }
            else if b == 0xC2, i + 1 < text.endIndex, text[i + 1] == 0x85 { width = 2 }
            else if b == 0xE2, i + 2 < text.endIndex, text[i + 1] == 0x80, text[i + 2] == 0xA8 || text[i + 2] == 0xA9 { width = 3 }
            if width == 0 { i += 1; continue }
            if i > start { out.append(text[start..<i]) }
            i += width
            start = i
        }
        if start < text.endIndex { out.append(text[start...]) }
        return out
    }

    /// Without leading and trailing blanks and tabs.
    static func trim(_ s: ArraySlice<UInt8>) -> ArraySlice<UInt8> {
        let blank: (UInt8) -> Bool = { $0 == 0x20 || $0 == 0x09 }
        guard let first = s.firstIndex(where: { !blank($0) }), let last = s.lastIndex(where: { !blank($0) }) else { return [] }
        return s[first...last]
    }

    static func parseExtent(_ line: ArraySlice<UInt8>, lineNumber: Int, file: String) throws -> Extent {
        func bad(_ why: String) -> BlockError {
            .invalid(file: file, field: "VMDK extent line \(lineNumber)", detail: "\(why): '\(String(decoding: line, as: UTF8.self).prefix(120))'")
        }
        // ACCESS SECTORS TYPE ["FILE" [OFFSET]]
        var rest = line
        let blank: (UInt8) -> Bool = { $0 == 0x20 || $0 == 0x09 }
        func word() -> String? {
            rest = rest.drop(while: blank)
            guard let c = rest.first else { return nil }
            if c == UInt8(ascii: "\"") {
                let body = rest.dropFirst()
                guard let close = body.firstIndex(of: UInt8(ascii: "\"")) else { return nil }
                rest = body[(close + 1)...]
                return String(decoding: body[..<close], as: UTF8.self)
            }
            let end = rest.firstIndex(where: blank) ?? rest.endIndex
            defer { rest = rest[end...] }
            return String(decoding: rest[..<end], as: UTF8.self)
        }
        guard let a = word(), let access = Access(rawValue: a) else { throw bad("unknown access") }
        guard let s = word(), let sectors = UInt64(s) else { throw bad("sector count is not a number") }
        guard sectors <= Self.maxSectors else { throw bad("sector count \(sectors) is beyond 2^44 (8 PiB)") }
        guard let t = word() else { throw bad("missing extent type") }
        guard let type = ExtentType(rawValue: t) else {
            throw BlockError.unsupported(file: file, feature: "VMDK extent type '\(t)'")
        }
        let name = word()
        var offset: UInt64 = 0
        if let o = word() {
            guard let v = UInt64(o) else { throw bad("extent offset is not a number") }
            guard v <= Self.maxSectors else { throw bad("extent offset \(v) is beyond 2^44 sectors") }
            offset = v
        }
        if type != .zero && name == nil { throw bad("missing file name") }
        if word() != nil { throw bad("unexpected text after the extent") }
        return Extent(access: access, sectors: sectors, type: type, fileName: name, offset: offset)
    }
}
