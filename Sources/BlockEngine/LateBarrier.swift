/// A write-back barrier whose body is set once the driver that owns it exists: a
/// `TableCache` is built before its driver's `self` may be captured, yet its barrier needs
/// the driver (VDI's header, VHD's block bitmaps and footer).
public final class LateBarrier: @unchecked Sendable { // `body` is set once, in the driver's init, before any write
    public var body: (() throws -> Void)?
    public init() {}
    public func callAsFunction() throws { try body?() }
}
