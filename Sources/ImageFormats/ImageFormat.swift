import BlockEngine

/// The formats rawmount knows. Probing reads the first bytes once.
public enum ImageFormat: String, CaseIterable, Sendable {
    case raw

    /// Picks the format from the file's first bytes; anything unrecognised is raw, as in QEMU.
    public static func probe(_ file: ImageFile) throws -> ImageFormat {
        return .raw
    }
}
