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

    public static func parse(_ bytes: [UInt8], file: String) throws -> VMDKDescriptor {
        guard bytes.count <= maxBytes else {
            throw BlockError.invalid(file: file, field: "VMDK descriptor", detail: "larger than 1 MiB")
        }
        var d = VMDKDescriptor()
        let text = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        for (n, rawLine) in text.split(whereSeparator: { $0.isNewline }).enumerated() {
            let line = rawLine.trimmed
            if line.isEmpty || line.hasPrefix("#") { continue }
            if let first = line.split(separator: " ", maxSplits: 1).first, Access(rawValue: String(first)) != nil {
                d.extents.append(try parseExtent(line, lineNumber: n + 1, file: file))
                continue
            }
            guard let eq = line.firstIndex(of: "=") else {
                throw BlockError.invalid(file: file, field: "VMDK descriptor line \(n + 1)", detail: "'\(line.prefix(80))' is neither key=value nor an extent")
            }
            let key = String(line[..<eq]).trimmed
            var value = String(line[line.index(after: eq)...]).trimmed
            if value.count >= 2, value.hasPrefix("\""), value.hasSuffix("\"") { value = String(value.dropFirst().dropLast()) }
            d.fields[key] = value
        }
        return d
    }

    static func parseExtent(_ line: String, lineNumber: Int, file: String) throws -> Extent {
        func bad(_ why: String) -> BlockError {
            .invalid(file: file, field: "VMDK extent line \(lineNumber)", detail: "\(why): '\(line.prefix(120))'")
        }
        // ACCESS SECTORS TYPE ["FILE" [OFFSET]]
        var rest = Substring(line)
        func word() -> String? {
            rest = rest.drop(while: { $0 == " " || $0 == "\t" })
            guard !rest.isEmpty else { return nil }
            if rest.first == "\"" {
                let body = rest.dropFirst()
                guard let close = body.firstIndex(of: "\"") else { return nil }
                let w = String(body[..<close])
                rest = body[body.index(after: close)...]
                return w
            }
            let end = rest.firstIndex(where: { $0 == " " || $0 == "\t" }) ?? rest.endIndex
            let w = String(rest[..<end]); rest = rest[end...]
            return w
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

extension StringProtocol {
    /// Without leading and trailing blanks and tabs. On the UTF-8 bytes: a split VMDK's
    /// descriptor has thousands of lines, and only ASCII bytes are cut.
    var trimmed: String {
        let bytes = Array(utf8)
        let blank: (UInt8) -> Bool = { $0 == 0x20 || $0 == 0x09 }
        guard let first = bytes.firstIndex(where: { !blank($0) }), let last = bytes.lastIndex(where: { !blank($0) }) else { return "" }
        return String(decoding: bytes[first...last], as: UTF8.self)
    }
}
