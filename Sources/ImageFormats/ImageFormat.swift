import BlockEngine

/// A format rawmount knows, by name. Each format folder defines its constant (`.qcow2`) and
/// its `FormatOpening`; `FormatRegistry.formats` lists them. Probing reads the first bytes once.
public struct ImageFormat: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: String

    /// Only names in the registry (and raw) are formats.
    public init?(rawValue: String) {
        guard Self.allCases.contains(where: { $0.rawValue == rawValue }) else { return nil }
        self.rawValue = rawValue
    }
    init(name: String) { rawValue = name }

    public var description: String { rawValue }

    /// Raw: every byte of the file is a guest byte (what a file of no known format is).
    public static let raw = ImageFormat(name: "raw")

    /// Raw, then every registered format.
    public static var allCases: [ImageFormat] { [.raw] + FormatRegistry.formats.map { $0.format } }

    /// What opens this format (nil for raw, which the opener handles itself).
    var opening: (any FormatOpening.Type)? { FormatRegistry.formats.first { $0.format == self } }

    /// Formats rawmount can write, listed positively (`FormatOpening.writes`); the others
    /// are always opened read-only.
    public var supportsWriting: Bool { self == .raw || (opening?.writes ?? false) }

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
        FormatRegistry.formats.first { $0.probe(head) }?.format
    }

    /// Which format, other than raw, a first sector like `head` would probe as; nil for raw.
    static func nonRawName(head: [UInt8]) -> String? {
        recognised(head: head).map { $0.rawValue.uppercased() } ?? ForeignFormat.name(head: head)
    }
}
