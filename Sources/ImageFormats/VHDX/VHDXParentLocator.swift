import BlockEngine

/// A differencing VHDX's parent locator (metadata item): a locator type (the VHDX parent
/// type), then key-value pairs of UTF-16LE strings at offsets inside the item. The keys a
/// reader uses: parent_linkage (the parent's data-write GUID, "{...}"), parent_linkage2,
/// relative_path, volume_path, absolute_win32_path. As for VHD, on this host a path is a
/// name looked for beside the child: a relative one from the child's folder, the others by
/// their last component.
public struct VHDXParentLocator: Sendable {
    static let vhdxParentType = VHDXGUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
    public var entries: [String: String]

    static func parse(_ b: [UInt8], file: String) throws -> VHDXParentLocator {
        guard b.count >= 20 else { throw BlockError.invalid(file: file, field: "VHDX parent locator", detail: "shorter than its header") }
        guard VHDXGUID(bytes: Array(b[0..<16])) == vhdxParentType else {
            throw BlockError.unsupported(file: file, feature: "a parent locator of type \(VHDXGUID(bytes: Array(b[0..<16]))) (a VHDX parent is read)")
        }
        let count = Int(le16(b, 18))
        guard 20 + count * 12 <= b.count else {
            throw BlockError.invalid(file: file, field: "VHDX parent locator", detail: "\(count) entries do not fit its \(b.count) bytes")
        }
        var entries: [String: String] = [:]
        for i in 0..<count {
            let e = 20 + i * 12
            func text(_ offset: Int, _ length: Int) throws -> String {
                guard offset <= b.count, length <= b.count - offset, length % 2 == 0 else {
                    throw BlockError.invalid(file: file, field: "VHDX parent locator entry \(i)", detail: "\(length) bytes at \(offset) lie outside it")
                }
                return VHDParentLocator.utf16(Array(b[offset ..< offset + length]) + [0, 0], bigEndian: false)
            }
            entries[try text(Int(le32(b, e)), Int(le16(b, e + 8)))] = try text(Int(le32(b, e + 4)), Int(le16(b, e + 10)))
        }
        return VHDXParentLocator(entries: entries)
    }

    /// The GUIDs a parent's data-write GUID must be one of (braces and case ignored).
    var linkages: [String] {
        ["parent_linkage", "parent_linkage2"].compactMap { entries[$0] }
            .map { String($0.filter { $0 != "{" && $0 != "}" }).uppercased() }
    }

    /// Names to look for, beside the child, in the order tried.
    var candidates: [String] {
        var names: [String] = []
        if var rel = entries["relative_path"]?.replacing("\\", with: "/") {
            while rel.hasPrefix("./") { rel.removeFirst(2) }
            names.append(rel)
        }
        for key in ["absolute_win32_path", "volume_path"] {
            if let last = entries[key]?.replacing("\\", with: "/").split(separator: "/").last.map(String.init), !names.contains(last) {
                names.append(last)
            }
        }
        return names.filter { !$0.isEmpty && !$0.contains("\0") }
    }
}
