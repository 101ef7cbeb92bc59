/// Overflow-checked arithmetic for values read from untrusted images: a wrap is reported as
/// an invalid field instead of trapping or producing a small bogus offset.
public enum Checked {
    public static func mul(_ a: UInt64, _ b: UInt64, file: String, field: String) throws -> UInt64 {
        let (r, o) = a.multipliedReportingOverflow(by: b)
        if o { throw BlockError.invalid(file: file, field: field, detail: "\(a) × \(b) overflows 64 bits") }
        return r
    }
    public static func add(_ a: UInt64, _ b: UInt64, file: String, field: String) throws -> UInt64 {
        let (r, o) = a.addingReportingOverflow(b)
        if o { throw BlockError.invalid(file: file, field: field, detail: "\(a) + \(b) overflows 64 bits") }
        return r
    }
}

extension UInt64 {
    /// Rounds up to a multiple of a power-of-two `alignment`; callers bound self first.
    @inlinable public func alignedUp(_ alignment: UInt64) -> UInt64 { (self + alignment - 1) & ~(alignment - 1) }
    @inlinable public func alignedDown(_ alignment: UInt64) -> UInt64 { self & ~(alignment - 1) }
    @inlinable public var isPowerOfTwo: Bool { self != 0 && (self & (self - 1)) == 0 }
}
