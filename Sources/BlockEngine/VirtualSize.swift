/// The one bound on a disk's virtual size read from an image: the raw file's size is an
/// `off_t`, and every guest offset plus a request length must stay representable, so sizes
/// above 2^63-1 are refused where they are read (and again when a driver is opened).
public enum VirtualSize {
    public static let maximum = UInt64(Int64.max)

    /// `value` if it is a size the rest of the code can represent (and, with `sectors`, a
    /// multiple of 512); otherwise the error names the field.
    @discardableResult
    public static func checked(_ value: UInt64, file: String, field: String, sectors: Bool = true) throws -> UInt64 {
        guard value <= maximum else {
            throw BlockError.invalid(file: file, field: field, detail: "\(value) bytes is larger than 2^63-1, the largest disk a file can show")
        }
        if sectors && value % 512 != 0 {
            throw BlockError.invalid(file: file, field: field, detail: "\(value) is not a multiple of 512")
        }
        return value
    }
}
