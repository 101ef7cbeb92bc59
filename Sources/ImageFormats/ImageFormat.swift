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
    public static func probe(_ file: ImageFile) throws -> ImageFormat {
        var head = [UInt8](repeating: 0, count: 512)
        let n = try head.withUnsafeMutableBytes { try file.readUpTo(into: $0, at: 0) }
        head.removeLast(head.count - n)
        if QEDHeader.probe(head) { return .qed }
        if VDIHeader.probe(head) { return .vdi }
        if BochsHeader.probe(head) { return .bochs }
        if VMDKSparseHeader.probe(head) || VMDKDescriptor.probe(head) { return .vmdk }
        return .raw
    }
}
