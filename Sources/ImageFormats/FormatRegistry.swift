import BlockEngine

/// The formats rawmount reads besides raw, in probing order. A new format is its folder
/// (header, driver, a `FormatOpening`) plus one line here.
public enum FormatRegistry {
    static let formats: [any FormatOpening.Type] = [
        QEDFormat.self,
        VDIFormat.self,
        BochsFormat.self,
        VMDKFormat.self,
        QCOW2Format.self,
        VHDFormat.self,
        VHDXFormat.self,
        SplitRawFormat.self,
        EWFFormat.self,
    ]
}

/// How the opener recognises and opens one format.
protocol FormatOpening: Sendable {
    static var format: ImageFormat { get }
    /// Whether rawmount writes this format (false unless a format says so).
    static var writes: Bool { get }
    /// Whether the format holds internal snapshots (`--snapshot`).
    static var hasSnapshots: Bool { get }
    /// Whether a first sector like `head` is this format.
    static func probe(_ head: [UInt8]) -> Bool
    /// Whether this image, of a format that writes, may be opened for writing (a VirtualBox
    /// differencing image is not); asked of the read-only descriptor before it is reopened.
    static func takesWrites(_ file: ImageFile) throws -> Bool
    /// Opens the image (its file already opened as writable as it will be, and locked), with
    /// whatever it names (backing files, extents, parents) through `request`.
    static func open(_ request: OpenRequest) throws -> BlockDevice
}

extension FormatOpening {
    static var writes: Bool { false }
    static var hasSnapshots: Bool { false }
    static func takesWrites(_ file: ImageFile) throws -> Bool { true }
}

/// One image being opened: its file, the caller's options, and the chain above it, with the
/// ways to open what it names under the opener's rules (read-only, same locking, loop check).
struct OpenRequest {
    let path: String
    let file: ImageFile
    let options: ImageOpener.Options
    /// The files (device, inode) of the images above and including this one, child first.
    let chain: [FileIdentity]

    var writable: Bool { file.isWritable }

    /// A backing image named by this one (relative to it), read-only; `format` nil probes.
    /// nil only for a missing file when the options tolerate it (`info`).
    func backing(_ name: String, format: ImageFormat?) throws -> BlockDevice? {
        try ImageOpener.openBacking(name, of: path, format: format, options: options, chain: chain)
    }

    /// An image this format finds by its own rule (a VDI parent, a Bochs base), read-only.
    func related(_ path: String, format: ImageFormat? = nil) throws -> BlockDevice {
        try ImageOpener.open(path: path, options: .init(writable: false, format: format, lock: options.lock), chain: chain)
    }

    /// Tells the user something about the image (`Options.onNote`), prefixed with its path.
    func note(_ text: String) { options.onNote?("\(path): \(text)") }
}
