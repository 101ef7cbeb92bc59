import BlockEngine
import CZlib
#if canImport(Glibc)
import Glibc
#endif

/// What an EWF set says about its case and acquisition: the header sections (header2 in
/// UTF-16, header in ASCII, EWF-X's xheader in XML), the stored digests (hash, digest, xhash)
/// and the acquisition errors (error2). Every value is the acquirer's text: callers escape it.
public struct EWFCaseInfo: Sendable {
    /// Values by ewfinfo's names, in ewfinfo's order, only those present and not empty.
    public var values: [(name: String, value: String)] = []
    public var md5: String?
    public var sha1: String?
    /// Sector ranges the acquirer could not read (stored as zeros).
    public var errors: [(first: UInt64, count: UInt64)] = []

    /// Header values as ewfinfo shows them: identifier, label.
    static let labels: [(key: String, label: String)] = [
        ("c", "case number"), ("a", "description"), ("e", "examiner name"), ("n", "evidence number"),
        ("t", "notes"), ("m", "acquisition date"), ("u", "system date"), ("ov", "operating system used"),
        ("av", "software version used"), ("md", "model"), ("sn", "serial number"), ("l", "device label"),
        ("pid", "process identifier"),
    ]

    /// Largest inflated header accepted (EnCase limits its fields to a few KiB each).
    static let maxHeaderBytes = 1 << 20

    /// Reads the values from the header2 section if there is one, else the header section.
    mutating func readHeader(_ compressed: [UInt8], utf16: Bool, file: String, section: String) throws {
        let text = try Self.inflate(compressed, file: file, section: section)
        let decoded = utf16 ? Self.utf16(text) : String(decoding: text, as: UTF8.self)
        let lines = decoded.split(separator: "\n", omittingEmptySubsequences: false).map { $0.hasSuffix("\r") ? $0.dropLast() : $0 }
        // 1: categories, 2: "main", 3: identifiers, 4: values (tab separated).
        guard lines.count >= 4, lines[1] == "main" else {
            throw BlockError.invalid(file: file, field: "EWF \(section) section", detail: "no main category of case values")
        }
        let keys = lines[2].split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
        let vals = lines[3].split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
        var byKey: [String: String] = [:]
        for (k, v) in zip(keys, vals) where byKey[k] == nil { byKey[k] = v }
        values = Self.labels.compactMap { key, label in
            guard var v = byKey[key], !v.isEmpty else { return nil }
            if key == "m" || key == "u" { v = Self.dateText(v) ?? v }
            return (label, v)
        }
        if let p = byKey["p"], !p.isEmpty, p != "0" { values.append(("password", "set (hash \(p))")) }
    }

    /// Adds what an EWF-X xheader says that the header did not (its acquiry date text).
    mutating func readXHeader(_ compressed: [UInt8], file: String) throws {
        let xml = String(decoding: try Self.inflate(compressed, file: file, section: "xheader"), as: UTF8.self)
        let pairs = [("case_number", "case number"), ("description", "description"), ("examiner_name", "examiner name"),
                     ("evidence_number", "evidence number"), ("notes", "notes"), ("acquiry_date", "acquisition date"),
                     ("acquiry_operating_system", "operating system used"), ("acquiry_software_version", "software version used")]
        for (tag, label) in pairs where !values.contains(where: { $0.name == label }) {
            if let v = Self.element(tag, in: xml), !v.isEmpty { values.append((label, v)) }
        }
    }

    /// The hash section: MD5 of the media, then 16 bytes, then an Adler-32.
    mutating func readHash(_ d: [UInt8], file: String) throws {
        guard d.count >= 36, ewfAdler32(d[0..<32]) == le32(d, 32) else {
            throw BlockError.invalid(file: file, field: "EWF hash section", detail: "too short or checksum mismatch (damaged)")
        }
        if md5 == nil { md5 = Self.digest(d[0..<16]) }
    }

    /// The digest section: MD5, SHA-1, 40 bytes of padding, an Adler-32.
    mutating func readDigest(_ d: [UInt8], file: String) throws {
        guard d.count >= 80, ewfAdler32(d[0..<76]) == le32(d, 76) else {
            throw BlockError.invalid(file: file, field: "EWF digest section", detail: "too short or checksum mismatch (damaged)")
        }
        // The digest section is the newer one: it wins over the hash section.
        if let m = Self.digest(d[0..<16]) { md5 = m }
        if let s = Self.digest(d[16..<36]) { sha1 = s }
    }

    /// EWF-X's xhash: XML with <MD5> and <SHA1>.
    mutating func readXHash(_ compressed: [UInt8], file: String) throws {
        let xml = String(decoding: try Self.inflate(compressed, file: file, section: "xhash"), as: UTF8.self)
        func hexDigest(_ tag: String, _ count: Int) -> String? {
            let v = (Self.element(tag, in: xml) ?? Self.element(tag.lowercased(), in: xml))?.lowercased()
            return v.flatMap { $0.count == count && $0.allSatisfy(\.isHexDigit) && $0.contains { $0 != "0" } ? $0 : nil }
        }
        if md5 == nil { md5 = hexDigest("MD5", 32) }
        if sha1 == nil { sha1 = hexDigest("SHA1", 40) }
    }

    /// The error2 section: a 520-byte header (count, padding, Adler-32), entries of (first
    /// sector, sector count), an Adler-32 of the entries.
    mutating func readErrors(_ d: [UInt8], file: String) throws {
        func bad(_ detail: String) -> BlockError { .invalid(file: file, field: "EWF error2 section", detail: detail) }
        guard d.count >= 520, ewfAdler32(d[0..<516]) == le32(d, 516) else { throw bad("too short or header checksum mismatch (damaged)") }
        let n = Int(le32(d, 0))
        guard n <= (d.count - 520) / 8 else { throw bad("\(n) entries do not fit in its \(d.count) bytes") }
        if d.count >= 520 + 8 * n + 4, ewfAdler32(d[520..<(520 + 8 * n)]) != le32(d, 520 + 8 * n) {
            throw bad("entry checksum mismatch (damaged)")
        }
        errors = (0..<n).map { (UInt64(le32(d, 520 + 8 * $0)), UInt64(le32(d, 524 + 8 * $0))) }
    }

    // MARK: decoding

    static func inflate(_ compressed: [UInt8], file: String, section: String) throws -> [UInt8] {
        var produced = 0
        var rc: Int32 = 0
        let out = [UInt8](unsafeUninitializedCapacity: maxHeaderBytes) { buffer, n in
            rc = compressed.withUnsafeBytes { rm_inflate($0.baseAddress, $0.count, buffer.baseAddress, maxHeaderBytes, &produced, 15) }
            n = rc == Z_OK ? produced : 0
        }
        guard rc == Z_OK else {
            throw BlockError.invalid(file: file, field: "EWF \(section) section", detail: "its zlib stream is damaged")
        }
        return out
    }

    /// UTF-16 text with its byte order mark (little-endian without one); NULs end it.
    static func utf16(_ bytes: [UInt8]) -> String {
        var big = false, start = 0
        if bytes.count >= 2 {
            if bytes[0] == 0xFE && bytes[1] == 0xFF { big = true; start = 2 } else if bytes[0] == 0xFF && bytes[1] == 0xFE { start = 2 }
        }
        var units: [UInt16] = []
        units.reserveCapacity((bytes.count - start) / 2)
        var i = start
        while i + 1 < bytes.count {
            let u = big ? UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1]) : UInt16(bytes[i + 1]) << 8 | UInt16(bytes[i])
            if u == 0 { break }
            units.append(u)
            i += 2
        }
        return String(decoding: units, as: UTF16.self)
    }

    /// A date value as ewfinfo prints it: POSIX seconds (header2, linen) in local time, or
    /// "year month day hour minute second" (header), taken as written.
    static func dateText(_ v: String) -> String? {
        var parts = tm()
        let fields = v.split(separator: " ").compactMap { Int($0) }
        if fields.count == 1, let seconds = Int(v), seconds >= 0 {
            var t = time_t(seconds)
            guard localtime_r(&t, &parts) != nil else { return nil }
        } else if fields.count == 6, (1...12).contains(fields[1]), (1...31).contains(fields[2]) {
            parts.tm_year = Int32(clamping: fields[0] - 1900); parts.tm_mon = Int32(fields[1] - 1); parts.tm_mday = Int32(fields[2])
            parts.tm_hour = Int32(clamping: fields[3]); parts.tm_min = Int32(clamping: fields[4]); parts.tm_sec = Int32(clamping: fields[5])
            var t = timegm(&parts)  // only to learn the weekday; printed as written
            guard gmtime_r(&t, &parts) != nil else { return nil }
        } else {
            return nil
        }
        var out = [CChar](repeating: 0, count: 64)
        guard strftime(&out, out.count, "%a %b %e %H:%M:%S %Y", &parts) > 0 else { return nil }
        return String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Hex of a stored digest; nil when all zeros (not set).
    static func digest(_ bytes: ArraySlice<UInt8>) -> String? {
        guard bytes.contains(where: { $0 != 0 }) else { return nil }
        return bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    /// The text of the first `<tag>...</tag>` in `xml` (no nesting, no entities beyond the five).
    static func element(_ tag: String, in xml: String) -> String? {
        guard let open = xml.firstRange(of: "<\(tag)>"),
              let close = xml[open.upperBound...].firstRange(of: "</\(tag)>") else { return nil }
        return String(xml[open.upperBound..<close.lowerBound])
            .replacing("&lt;", with: "<").replacing("&gt;", with: ">")
            .replacing("&quot;", with: "\"").replacing("&apos;", with: "'").replacing("&amp;", with: "&")
    }
}
