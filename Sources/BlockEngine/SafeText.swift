extension String {
    /// The string with every control character written out (`\n`, `\t`, `\x1b`, `\u{202e}`):
    /// C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal
    /// shows. Strings that came from an image or a file name pass through this before they
    /// reach a terminal, a log line or the mount's status pipe, where a newline would forge a
    /// line and an escape sequence would drive the terminal.
    public var escapingControls: String {
        guard unicodeScalars.contains(where: Self.isUnsafe) else { return self }
        var out = ""
        for u in unicodeScalars {
            guard Self.isUnsafe(u) else { out.unicodeScalars.append(u); continue }
            switch u {
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            default:
                let hex = String(u.value, radix: 16)
                out += u.value < 0x100 ? "\\x" + (hex.count < 2 ? "0" : "") + hex : "\\u{\(hex)}"
            }
        }
        return out
    }

    /// Like `escapingControls`, but keeps line breaks and tabs: for whole reports whose lines
    /// this program made (each image string in them escaped on its own).
    public var escapingControlsButLines: String {
        guard unicodeScalars.contains(where: { Self.isUnsafe($0) && $0 != "\n" && $0 != "\t" }) else { return self }
        return split(separator: "\n", omittingEmptySubsequences: false)
            .map { $0.split(separator: "\t", omittingEmptySubsequences: false).map { String($0).escapingControls }.joined(separator: "\t") }
            .joined(separator: "\n")
    }

    static func isUnsafe(_ u: Unicode.Scalar) -> Bool {
        let v = u.value
        return v < 0x20 || (0x7F...0x9F).contains(v) || (0x202A...0x202E).contains(v) || (0x2066...0x2069).contains(v)
    }
}
