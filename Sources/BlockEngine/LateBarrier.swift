/// A hook a driver's table cache calls, whose body is set once the driver exists: a
/// `TableCache` is built before its driver's `self` may be captured, yet its barrier or
/// journal needs the driver (VDI's header, VHD's block bitmaps and footer, VHDX's log).
public final class LateHook<Input>: @unchecked Sendable { // `body` is set once, in the driver's init, before any write
    public var body: ((Input) throws -> Void)?
    public init() {}
    public func callAsFunction(_ input: Input) throws { try body?(input) }
}

/// A write-back barrier (no input).
public typealias LateBarrier = LateHook<Void>

extension LateHook where Input == Void {
    public func callAsFunction() throws { try body?(()) }
}
