import BlockEngine

/// Image formats QEMU knows that rawmount does not read. Falling back to raw for them, as for
/// an unrecognised file, would show the container's bytes as the disk and let writes through
/// the mount corrupt the image, so probing names them and refuses instead.
enum ForeignFormat {
    /// The name of a foreign format recognised from the file's first 512 bytes, or from the
    /// last 512 of a file named .dmg (`dmgTrailer`, empty otherwise), or nil.
    static func name(head: [UInt8], dmgTrailer: [UInt8] = []) -> String? {
        func starts(_ magic: String) -> Bool { head.starts(with: Array(magic.utf8)) }
        if head.starts(with: [0x51, 0x46, 0x49, 0xFB]) && head.count >= 8 {  // "QFI\xfb"
            let version = UInt32(head[4]) << 24 | UInt32(head[5]) << 16 | UInt32(head[6]) << 8 | UInt32(head[7])
            return version == 1 ? "qcow (version 1)" : "qcow2 (version \(version))"
        }
        if starts("WithoutFreeSpace") || starts("WithouFreSpacExt") { return "Parallels" }
        if head.starts(with: Array("LUKS".utf8) + [0xBA, 0xBE]) { return "LUKS (encrypted)" }
        if starts("#!/bin/sh\n#V2.0 Format\nmodprobe cloop") { return "cloop" }
        if dmgTrailer.starts(with: Array("koly".utf8)) { return "DMG" }
        return nil
    }
}
