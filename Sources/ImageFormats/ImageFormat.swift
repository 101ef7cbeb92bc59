import BlockEngine

/// The formats rawmount knows. Probing reads the first bytes once.
public enum ImageFormat: String, CaseIterable, Sendable {
    case raw
    case qed
    case vdi
    case bochs
    case vmdk

    /// Formats rawmount can write; the others are always opened read-only.
    public var supportsWriting: Bool { self != .bochs }

    /// Picks the format from the file's first bytes; anything unrecognised is raw, as in QEMU.
    /// Formats QEMU reads and rawmount does not (qcow2, VHDX, ...) are refused, naming the
    /// format: read as raw they would show container bytes and take writes that corrupt them.
    public static func probe(_ file: ImageFile) throws -> ImageFormat {
        var head = [UInt8](repeating: 0, count: 512)
        let n = try head.withUnsafeMutableBytes { try file.readUpTo(into: $0, at: 0) }
        head.removeLast(head.count - n)
        if let format = recognised(head: head) { return format }
        var tail = [UInt8]()
        let size = try file.size()
        if size >= 1024 {
            tail = [UInt8](repeating: 0, count: 512)
            let got = try tail.withUnsafeMutableBytes { try file.readUpTo(into: $0, at: size - 512) }
            tail.removeLast(tail.count - got)
        }
        if let foreign = ForeignFormat.name(head: head, tail: tail, path: file.path) {
            throw BlockError.unsupported(file: file.path, feature: "this is a \(foreign) image, which rawmount does not read; "
                + "`qemu-img convert -O qed` makes an image it does, and --format raw shows the file's own bytes")
        }
        return .raw
    }

    /// The supported non-raw format whose header starts `head`, or nil.
    static func recognised(head: [UInt8]) -> ImageFormat? {
        if QEDHeader.probe(head) { return .qed }
        if VDIHeader.probe(head) { return .vdi }
        if BochsHeader.probe(head) { return .bochs }
        if VMDKSparseHeader.probe(head) || VMDKDescriptor.probe(head) { return .vmdk }
        return nil
    }

    /// Which format, other than raw, a first sector like `head` would probe as; nil for raw.
    static func nonRawName(head: [UInt8]) -> String? {
        recognised(head: head).map { $0.rawValue.uppercased() } ?? ForeignFormat.name(head: head, tail: [])
    }
}
