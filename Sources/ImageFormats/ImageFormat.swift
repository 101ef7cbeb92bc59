import BlockEngine

/// The formats rawmount knows. Probing reads the first bytes once.
public enum ImageFormat: String, CaseIterable, Sendable {
    case raw
    case qed
    case vdi
    case bochs
    case vmdk
    case qcow2

    /// Formats rawmount can write; the others are always opened read-only.
    public var supportsWriting: Bool { self != .bochs }

    /// Picks the format from the file's first bytes; anything unrecognised is raw, as in QEMU.
    /// Formats QEMU reads and rawmount does not (qcow2, VHDX, ...) are refused, naming the
    /// format: read as raw they would show container bytes and take writes that corrupt them.
    public static func probe(_ file: ImageFile) throws -> ImageFormat {
        func sector(at offset: UInt64) throws -> [UInt8] {
            var bytes = [UInt8](repeating: 0, count: 512)
            let n = try bytes.withUnsafeMutableBytes { try file.readUpTo(into: $0, at: offset) }
            bytes.removeLast(bytes.count - n)
            return bytes
        }
        let head = try sector(at: 0)
        if let format = recognised(head: head) { return format }
        // DMG has no header, only a trailer; QEMU goes by the .dmg name, so only then is it read.
        let trailer = file.path.lowercased().hasSuffix(".dmg") ? try sector(at: max(try file.size(), 512) - 512) : []
        if let foreign = ForeignFormat.name(head: head, dmgTrailer: trailer) {
            throw BlockError.unsupported(file: file.path, feature: "this is a \(foreign) image, which rawmount does not read; "
                + "`qemu-img convert -O qed` makes an image it does, and --format raw shows the file's own bytes")
        }
        return .raw
    }

    /// The supported non-raw format whose header starts `head`, or nil.
    static func recognised(head: [UInt8]) -> ImageFormat? {
        if QEDHeader.probe(head) { return .qed }
        if VDIHeader.probe(head) { return .vdi }
        if BochsHeader.probe(head) || BochsSparseHeader.probe(head) { return .bochs }
        if VMDKSparseHeader.probe(head) || VMDKDescriptor.probe(head) { return .vmdk }
        if QCOW2Header.probe(head) { return .qcow2 }
        return nil
    }

    /// Which format, other than raw, a first sector like `head` would probe as; nil for raw.
    static func nonRawName(head: [UInt8]) -> String? {
        recognised(head: head).map { $0.rawValue.uppercased() } ?? ForeignFormat.name(head: head)
    }
}
