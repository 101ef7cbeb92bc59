/// Where a byte of a multi-file image lives (a VMDK extent; next, EWF segments and split
/// raw pieces): which of the image's files, and the offset in it. Mappings and allocations
/// carry it packed into their UInt64 host address, the file number in the top bits, so two
/// files' addresses are never contiguous and a run never crosses from one file into the
/// next. Single-file formats use plain offsets (their file number is 0 and offsets may use
/// all the bits, as qcow2's do).
public struct HostAddress: Hashable, Sendable {
    public var file: Int
    public var offset: UInt64

    /// Bits of the offset within one file: 128 TiB, more than any of these formats allows.
    public static let offsetBits: UInt64 = 47
    public static let offsetMask: UInt64 = (1 << offsetBits) - 1
    /// Files one image may have (the rest of the 64 bits).
    public static let maxFiles = 1 << (64 - Int(offsetBits))

    public init(file: Int, offset: UInt64) {
        precondition(file >= 0 && file < Self.maxFiles && offset <= Self.offsetMask, "host address out of range")
        self.file = file; self.offset = offset
    }

    @inline(__always)
    public init(packed: UInt64) { file = Int(packed >> Self.offsetBits); offset = packed & Self.offsetMask }

    @inline(__always)
    public var packed: UInt64 { UInt64(file) << Self.offsetBits | offset }
}

/// The mapping role of a format whose bytes live in several files: it names the file of
/// each file number, and host addresses resolve through `HostAddress`.
public protocol MultiFileMapping: ImageMapping {
    /// The file of file number `index` (as the driver packed it into its host addresses).
    func hostFile(_ index: Int) -> ImageFile
}

extension MultiFileMapping {
    @inline(__always)
    public func resolve(host: UInt64) -> (file: ImageFile, offset: UInt64) {
        let a = HostAddress(packed: host)
        return (hostFile(a.file), a.offset)
    }
}
