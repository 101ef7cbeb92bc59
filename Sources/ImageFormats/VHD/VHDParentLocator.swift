import BlockEngine

/// Where a differencing VHD says its parent is: up to eight locators in the dynamic header
/// (platform code, data length, data offset in the file), as Windows and Virtual PC write
/// them: 'W2ru' a path relative to the child (UTF-16LE), 'W2ku' an absolute Windows path
/// (UTF-16LE), 'MacX' a file URL (UTF-8); and the parent's file name (UTF-16BE) in the
/// header itself. On this host a path is only a name to look for: relative ones from the
/// child's folder, the others by their last component in the child's folder.
public struct VHDParentLocator: Sendable {
    public var platform: String
    public var path: String
    /// Longest locator data read (a path).
    static let maxData = 64 << 10

    static func read(_ e: [UInt8], file: ImageFile, fileSize: UInt64) throws -> VHDParentLocator? {
        let code = String(decoding: e[0..<4], as: UTF8.self)
        let length = UInt64(be32(e, 8)), offset = be64(e, 16)
        guard ["W2ru", "W2ku", "MacX"].contains(code), length > 0 else { return nil }
        guard length <= UInt64(maxData), offset <= fileSize, length <= fileSize - offset else {
            throw BlockError.invalid(file: file.path, field: "VHD parent locator \(code)",
                                     detail: "\(length) bytes at \(offset) do not fit the \(fileSize)-byte file")
        }
        let data = try file.readBytes(count: Int(length), at: offset, what: "VHD parent locator")
        let path = code == "MacX" ? String(decoding: data.prefix { $0 != 0 }, as: UTF8.self) : utf16(data, bigEndian: false)
        return VHDParentLocator(platform: code, path: path)
    }

    /// UTF-16 text up to its first NUL.
    static func utf16(_ b: [UInt8], bigEndian: Bool) -> String {
        var units: [UInt16] = []
        for i in stride(from: 0, to: b.count - 1, by: 2) {
            let u = bigEndian ? UInt16(b[i]) << 8 | UInt16(b[i + 1]) : UInt16(b[i + 1]) << 8 | UInt16(b[i])
            if u == 0 { break }
            units.append(u)
        }
        return String(decoding: units, as: UTF16.self)
    }

    /// The name to look for, relative to the child's folder.
    var candidate: String? {
        var p = path
        if platform == "MacX", let r = p.firstRange(of: "://") {  // file://host/path
            p = String(p[r.upperBound...])
        }
        p = p.replacing("\\", with: "/")
        guard platform == "W2ru" else { return p.split(separator: "/").last.map(String.init) }
        while p.hasPrefix("./") { p.removeFirst(2) }
        return p.isEmpty ? nil : p
    }

    /// The names a child with `header` may find its parent by, in the order tried.
    static func candidates(_ header: VHDDynamicHeader) -> [String] {
        var names: [String] = []
        for platform in ["W2ru", "W2ku", "MacX"] {
            for l in header.locators where l.platform == platform { if let c = l.candidate, !names.contains(c) { names.append(c) } }
        }
        if !header.parentName.isEmpty, !names.contains(header.parentName) { names.append(header.parentName) }
        return names.filter { !$0.isEmpty && !$0.contains("\0") }
    }
}
